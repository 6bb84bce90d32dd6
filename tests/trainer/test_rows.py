"""Training rows: the horizon step (docs/design.md, "Horizon") and staleness, against hand-written values."""

from __future__ import annotations

import pytest

from trainer_server.rows import Annotation, Row, horizon_rows, stale_factor

COMPLETION = (10, 11, 12, 13, 14)


def annotation(rows, sequence_reward=None) -> Annotation:
    return Annotation("a", (1, 2), COMPLETION, 0, tuple(rows), sequence_reward=sequence_reward)


def weights(rows: list[Row]) -> dict[tuple[int, int, bool], float]:
    return {(r.position, r.token_id, r.replacement): pytest.approx(r.weight) for r in rows}


def test_horizon_one_keeps_the_rows_as_given():
    rows = [Row(1, 11, -1.0), Row(1, 99, 1.0, replacement=True), Row(3, 13, 0.0)]
    assert horizon_rows(annotation(rows), 1, 1.0) == rows  # a 0-weight label stays a row


def test_token_rewards_horizon_two():
    # r = [0, -1, 0, 0.5, 0]; G_t = r_t + r_{t+1}
    rows = [Row(1, 11, -1.0), Row(3, 13, 0.5)]
    got = horizon_rows(annotation(rows), 2, 1.0)
    assert weights(got) == {(0, 10, False): -1.0, (1, 11, False): -1.0, (2, 12, False): 0.5, (3, 13, False): 0.5}


def test_token_rewards_full_horizon_with_discount():
    # G_t = sum_k 0.9^k r_{t+k}, r = [0, -1, 0, 0.5, 0]
    rows = [Row(1, 11, -1.0), Row(3, 13, 0.5)]
    got = horizon_rows(annotation(rows), None, 0.9)
    assert weights(got) == {
        (0, 10, False): -0.9 + 0.9**3 * 0.5,
        (1, 11, False): -1.0 + 0.9**2 * 0.5,
        (2, 12, False): 0.9 * 0.5,
        (3, 13, False): 0.5,
    }


def test_sequence_reward_horizon_one_trains_only_the_last_token():
    got = horizon_rows(annotation([], sequence_reward=2.0), 1, 1.0)
    assert weights(got) == {(4, 14, False): 2.0}


def test_sequence_reward_full_horizon_gives_every_token_the_reward():
    got = horizon_rows(annotation([], sequence_reward=-0.5), None, 1.0)
    assert weights(got) == {(t, COMPLETION[t], False): -0.5 for t in range(5)}


def test_sequence_reward_adds_to_a_token_label_on_the_last_token():
    got = horizon_rows(annotation([Row(4, 14, 1.0)], sequence_reward=0.5), 1, 1.0)
    assert weights(got) == {(4, 14, False): 1.5}


def test_replacement_rows_stay_at_their_position_with_their_weight():
    rows = [Row(2, 12, -1.0), Row(2, 77, 0.7, replacement=True)]
    got = horizon_rows(annotation(rows), 3, 0.5)
    assert weights(got) == {
        (0, 10, False): 0.25 * -1.0,
        (1, 11, False): 0.5 * -1.0,
        (2, 12, False): -1.0,
        (2, 77, True): 0.7,
    }


def test_a_position_nothing_reaches_gets_no_row():
    got = horizon_rows(annotation([Row(0, 10, 1.0)]), 2, 1.0)
    assert [r.position for r in got] == [0]


@pytest.mark.parametrize(
    "version, limit, policy, expected",
    [(5, -1, "skip", 1.0), (5, 3, "skip", 1.0), (1, 3, "downweight", 0.5), (0, 3, "downweight", 0.25),
     (0, 3, "skip", None), (2, 3, "skip", 1.0)],
)
def test_stale_factor(version, limit, policy, expected):
    # current version 5; age = 5 - version; decay 0.5 per version past the limit
    assert stale_factor(version, 5, limit, policy, 0.5) == expected


def test_baseline_subtracts_the_batch_mean_return_from_sampled_rows_only():
    from trainer_server.rows import subtract_baseline

    batch = [[Row(0, 5, 1.0), Row(0, 9, 1.0, replacement=True)], [Row(1, 6, -1.0), Row(2, 7, 3.0)]]
    # mean of the sampled rows: (1 - 1 + 3) / 3 = 1
    assert subtract_baseline(batch) == [[Row(0, 5, 0.0), Row(0, 9, 1.0, replacement=True)],
                                        [Row(1, 6, -2.0), Row(2, 7, 2.0)]]
    assert subtract_baseline([[Row(0, 9, 1.0, replacement=True)]]) == [[Row(0, 9, 1.0, replacement=True)]]
