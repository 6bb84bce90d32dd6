package tokenfeedback

// The client against real servers: the harness (tests/clients/test_other_languages.py) starts a
// policy server and a trainer and passes their addresses in TOKENFEEDBACK_POLICY_ADDR and
// TOKENFEEDBACK_TRAINER_ADDR; without them these tests skip.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	v1 "tokenfeedback.dev/clients/go/tokenfeedbackv1"
)

var runID = fmt.Sprintf("go-%d-%d", os.Getpid(), time.Now().UnixNano())

func servers(t *testing.T) (*PolicyClient, *TrainerClient) {
	t.Helper()
	policyAddr, trainerAddr := os.Getenv("TOKENFEEDBACK_POLICY_ADDR"), os.Getenv("TOKENFEEDBACK_TRAINER_ADDR")
	if policyAddr == "" || trainerAddr == "" {
		t.Skip("TOKENFEEDBACK_POLICY_ADDR / TOKENFEEDBACK_TRAINER_ADDR not set")
	}
	policy, err := DialPolicy(policyAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	trainer, err := DialTrainer(trainerAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { policy.Close(); trainer.Close() })
	return policy, trainer
}

func wantCode(t *testing.T, err error, code codes.Code) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("want an *Error with %s, got %T %v", CodeName(code), err, err)
	}
	if e.Code != code {
		t.Fatalf("want %s, got %v", CodeName(code), err)
	}
	return e
}

func TestGenerateStreamsConsistentEvents(t *testing.T) {
	policy, _ := servers(t)
	ctx := context.Background()
	info, err := policy.GetModelInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.VocabSize <= 0 || info.MaxNewTokens <= 0 || info.ModelName == "" {
		t.Fatalf("model info: %v", info)
	}
	for _, alternatives := range []int32{0, 3} {
		t.Run(fmt.Sprintf("alternatives=%d", alternatives), func(t *testing.T) {
			stream := policy.Generate(ctx, &v1.GenerateRequest{
				PromptText: "Paris is the capital of",
				Params:     &v1.SamplingParams{MaxNewTokens: 10, Seed: proto.Uint64(3), NumAlternatives: alternatives, StopOnEos: proto.Bool(false)},
			})
			events, err := stream.All()
			if err != nil {
				t.Fatal(err)
			}
			start, end := events[0].GetStart(), events[len(events)-1].GetEnd()
			if start == nil || end == nil {
				t.Fatalf("first event %v, last %v", events[0], events[len(events)-1])
			}
			var text strings.Builder
			offset := int32(0)
			for i, event := range events[1 : len(events)-1] {
				token := event.GetToken()
				if token == nil || token.Position != int32(i) || token.CharStart != offset ||
					token.CharEnd-token.CharStart != int32(utf8.RuneCountInString(token.Text)) {
					t.Fatalf("event %d: %v (offset %d)", i, event, offset)
				}
				if token.Logprob > 0 || token.SamplingLogprob > 0 || token.Rank < 1 || token.ModelVersion != start.ModelVersion ||
					int32(len(token.Alternatives)) != alternatives {
					t.Fatalf("token %d: %v", i, token)
				}
				for k := 1; k < len(token.Alternatives); k++ {
					if token.Alternatives[k-1].Logprob < token.Alternatives[k].Logprob {
						t.Fatalf("token %d: alternatives not sorted: %v", i, token.Alternatives)
					}
				}
				text.WriteString(token.Text)
				offset = token.CharEnd
			}
			if len(events) != 12 || end.CompletionTokens != 10 || end.FinishReason != v1.FinishReason_FINISH_REASON_LENGTH ||
				end.CompletionText != text.String() || end.PromptTokens != int32(len(start.PromptTokenIds)) {
				t.Fatalf("%d events, end %v, joined text %q", len(events), end, text.String())
			}
		})
	}
}

func TestSameSeedSameTokensAndScoreAgrees(t *testing.T) {
	policy, _ := servers(t)
	ctx := context.Background()
	request := &v1.GenerateRequest{PromptText: "Berlin is", Params: &v1.SamplingParams{MaxNewTokens: 8, Seed: proto.Uint64(11), StopOnEos: proto.Bool(false)}}
	a, err := policy.Complete(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	b, err := policy.Complete(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]int32, len(a.Tokens))
	for i, token := range a.Tokens {
		ids[i] = token.TokenId
		if b.Tokens[i].TokenId != token.TokenId {
			t.Fatalf("seeded generations differ at %d", i)
		}
	}
	scored, err := policy.Score(ctx, &v1.ScoreRequest{PromptTokenIds: a.Start.PromptTokenIds, CompletionTokenIds: ids})
	if err != nil {
		t.Fatal(err)
	}
	if len(scored.Tokens) != len(ids) || scored.CompletionText != a.End.CompletionText {
		t.Fatalf("score: %d tokens, text %q", len(scored.Tokens), scored.CompletionText)
	}
	total := 0.0
	for i, token := range scored.Tokens {
		total += float64(token.Logprob)
		if scored.ModelVersion == a.Start.ModelVersion && math.Abs(float64(token.Logprob-a.Tokens[i].Logprob)) > 1e-3 {
			t.Fatalf("position %d: scored %v, streamed %v", i, token.Logprob, a.Tokens[i].Logprob)
		}
	}
	if math.Abs(total-scored.TotalLogprob) > 1e-3 {
		t.Fatalf("total %v vs %v", total, scored.TotalLogprob)
	}
}

func TestTokenizeRoundTripsUnicode(t *testing.T) {
	policy, _ := servers(t)
	text := "Café au lait costs 3€. 😀 漢字"
	pieces, err := policy.Tokenize(context.Background(), &v1.TokenizeRequest{Text: text})
	if err != nil {
		t.Fatal(err)
	}
	var joined strings.Builder
	ids := make([]int32, len(pieces.Tokens))
	for i, piece := range pieces.Tokens {
		joined.WriteString(piece.Text)
		ids[i] = piece.TokenId
	}
	last := pieces.Tokens[len(pieces.Tokens)-1]
	if joined.String() != text || last.CharEnd != int32(utf8.RuneCountInString(text)) {
		t.Fatalf("pieces %q, last end %d", joined.String(), last.CharEnd)
	}
	back, err := policy.Tokenize(context.Background(), &v1.TokenizeRequest{TokenIds: ids})
	if err != nil || back.Text != text {
		t.Fatalf("decoded %q, %v", back.GetText(), err)
	}
}

func TestAlignSpans(t *testing.T) {
	policy, _ := servers(t)
	text := "Paris is the capital of France."
	start := int32(strings.Index(text, "France"))
	reply, err := policy.AlignSpans(context.Background(), &v1.AlignSpansRequest{Text: text, Spans: []*v1.CharSpan{{Start: start, End: start + 6, Text: "France"}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(reply.Spans) != 1 || len(reply.Spans[0].TokenPositions) == 0 || reply.Spans[0].Start != start {
		t.Fatalf("alignment: %v", reply.Spans)
	}
	var covered strings.Builder
	for _, p := range reply.Spans[0].TokenPositions {
		covered.WriteString(reply.Tokens[p].Text)
	}
	if !strings.Contains(covered.String(), "France") && !strings.Contains("France", strings.TrimSpace(covered.String())) {
		t.Fatalf("covered %q", covered.String())
	}
}

func TestBadInputIsInvalidArgumentNamingTheField(t *testing.T) {
	policy, _ := servers(t)
	for name, c := range map[string]struct {
		request *v1.GenerateRequest
		field   string
	}{
		"top_p above 1":        {&v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{TopP: proto.Float32(1.5)}}, "params.top_p"},
		"negative temperature": {&v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{Temperature: proto.Float32(-1)}}, "params.temperature"},
		"both prompts":         {&v1.GenerateRequest{PromptText: "a", PromptTokenIds: []int32{1}}, "prompt_text"},
		"id outside vocab":     {&v1.GenerateRequest{PromptTokenIds: []int32{1 << 30}}, "prompt_token_ids"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := policy.Complete(context.Background(), c.request)
			if e := wantCode(t, err, codes.InvalidArgument); !strings.HasPrefix(e.Field, c.field) {
				t.Fatalf("field %q, want %s: %v", e.Field, c.field, e)
			}
		})
	}
	// ... and the server keeps serving.
	if _, err := policy.Complete(context.Background(), &v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{MaxNewTokens: 2}}); err != nil {
		t.Fatal(err)
	}
}

func TestDeadlines(t *testing.T) {
	policy, _ := servers(t)
	info, err := policy.GetModelInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = policy.Complete(ctx, &v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{MaxNewTokens: info.MaxNewTokens, StopOnEos: proto.Bool(false)}})
	wantCode(t, err, codes.DeadlineExceeded)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("errors.Is(context.DeadlineExceeded) false for %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Microsecond)
	defer cancel()
	_, err = policy.GetModelInfo(ctx)
	wantCode(t, err, codes.DeadlineExceeded)
}

func TestClosingAStreamEarlyCancelsIt(t *testing.T) {
	policy, _ := servers(t)
	ctx := context.Background()
	stream := policy.Generate(ctx, &v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{MaxNewTokens: 200, StopOnEos: proto.Bool(false)}})
	tokens := 0
	for tokens < 2 {
		event, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if event.GetToken() != nil {
			tokens++
		}
	}
	stream.Close()
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("after Close: %v", err)
	}
	next, err := policy.Complete(ctx, &v1.GenerateRequest{PromptText: "b", Params: &v1.SamplingParams{MaxNewTokens: 3, StopOnEos: proto.Bool(false)}})
	if err != nil || len(next.Tokens) != 3 {
		t.Fatalf("next generation: %v %v", next, err)
	}
	// Cancelling the context is CANCELLED.
	ctx, cancel := context.WithCancel(ctx)
	stream = policy.Generate(ctx, &v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{MaxNewTokens: 200, StopOnEos: proto.Bool(false)}})
	defer stream.Close()
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	for {
		_, err = stream.Recv()
		if err != nil {
			break
		}
	}
	wantCode(t, err, codes.Canceled)
}

func TestTLSAgainstPlaintextIsUnavailable(t *testing.T) {
	policy, _ := servers(t)
	tlsClient, err := DialPolicy(policy.Address, &Options{TLS: true, Retry: NoRetry, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer tlsClient.Close()
	_, err = tlsClient.GetModelInfo(context.Background())
	wantCode(t, err, codes.Unavailable)
}

func TestBearerTokenTravelsWithCalls(t *testing.T) {
	// The servers here have auth off and accept any token; plaintext must not refuse to send it.
	policy, _ := servers(t)
	withToken, err := DialPolicy(policy.Address, &Options{Token: "test-token"})
	if err != nil {
		t.Fatal(err)
	}
	defer withToken.Close()
	if _, err := withToken.GetModelInfo(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := withToken.Complete(context.Background(), &v1.GenerateRequest{PromptText: "a", Params: &v1.SamplingParams{MaxNewTokens: 1}}); err != nil {
		t.Fatal(err)
	}
}

// annotated is an annotation of c: the first token bad with a replacement, the last one good.
func annotated(id string, c *Completion) *v1.AnnotatedSequence {
	ids := make([]int32, len(c.Tokens))
	behavior := make([]float32, len(c.Tokens))
	for i, token := range c.Tokens {
		ids[i], behavior[i] = token.TokenId, token.SamplingLogprob
	}
	return &v1.AnnotatedSequence{
		AnnotationId: id, PromptTokenIds: c.Start.PromptTokenIds, CompletionTokenIds: ids,
		ModelVersion: c.Start.ModelVersion, BehaviorLogprobs: behavior,
		TokenLabels: []*v1.TokenLabel{
			{Position: 0, Weight: -1, ReplacementTokenId: proto.Int32((ids[0] + 1) % 50)},
			{Position: int32(len(ids) - 1), Weight: 0.5},
		},
		AnnotatorId: "clients/go tests",
		Metadata:    map[string]string{"suite": "go", "ключ": "значение"},
	}
}

type row struct {
	position, token int32
	weight          float64
	replacement     bool
}

func rowsOf(stored *v1.StoredAnnotation) []row {
	rows := make([]row, len(stored.Rows))
	for i, r := range stored.Rows {
		rows[i] = row{r.Position, r.TokenId, r.Weight, r.Replacement}
	}
	sort.Slice(rows, func(i, j int) bool {
		return rows[i].position < rows[j].position || rows[i].position == rows[j].position && !rows[i].replacement && rows[j].replacement
	})
	return rows
}

func TestTrainerSubmitReadBackTrain(t *testing.T) {
	policy, trainer := servers(t)
	ctx := context.Background()
	sample, err := policy.Complete(ctx, &v1.GenerateRequest{PromptText: "Ottawa is the capital of",
		Params: &v1.SamplingParams{MaxNewTokens: 6, Seed: proto.Uint64(5), StopOnEos: proto.Bool(false)}})
	if err != nil {
		t.Fatal(err)
	}
	last := int32(len(sample.Tokens) - 1)

	t.Run("submit, duplicate, read back", func(t *testing.T) {
		id := runID + "-submit"
		reply, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{annotated(id, sample)}, false)
		if err != nil {
			t.Fatal(err)
		}
		if r := reply.Results[0]; r.AnnotationId != id || r.Status != v1.SubmitStatus_SUBMIT_STATUS_ACCEPTED || r.Rows != 3 {
			t.Fatalf("result %v", r)
		}
		reply, err = trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{annotated(id, sample)}, false)
		if err != nil || reply.Results[0].Status != v1.SubmitStatus_SUBMIT_STATUS_DUPLICATE {
			t.Fatalf("resend: %v %v", reply, err)
		}
		stored, err := trainer.GetAnnotation(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		want := []row{
			{0, sample.Tokens[0].TokenId, -1, false},
			{0, (sample.Tokens[0].TokenId + 1) % 50, 1, true},
			{last, sample.Tokens[last].TokenId, 0.5, false},
		}
		if got := rowsOf(stored); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("rows %v, want %v", got, want)
		}
		if stored.Metadata["ключ"] != "значение" || stored.AnnotatorId != "clients/go tests" || stored.ModelVersion != sample.Start.ModelVersion {
			t.Fatalf("stored %v", stored)
		}
	})

	t.Run("invalid fails the call naming the field, nothing stored", func(t *testing.T) {
		good, bad := annotated(runID+"-good", sample), annotated(runID+"-bad", sample)
		bad.TokenLabels = []*v1.TokenLabel{{Position: 0, Weight: math.NaN()}}
		_, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{good, bad}, false)
		if e := wantCode(t, err, codes.InvalidArgument); e.Field != "sequences[1].token_labels[0].weight" {
			t.Fatalf("field %q: %v", e.Field, e)
		}
		for _, id := range []string{good.AnnotationId, bad.AnnotationId} {
			_, err := trainer.GetAnnotation(ctx, id)
			wantCode(t, err, codes.NotFound)
		}
	})

	t.Run("partial_ok stores the valid ones", func(t *testing.T) {
		good, bad := annotated(runID+"-partial-good", sample), annotated(runID+"-partial-bad", sample)
		bad.TokenLabels = []*v1.TokenLabel{{Position: 99, Weight: 1}}
		reply, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{good, bad}, true)
		if err != nil {
			t.Fatal(err)
		}
		if reply.Results[0].Status != v1.SubmitStatus_SUBMIT_STATUS_ACCEPTED || reply.Results[1].Status != v1.SubmitStatus_SUBMIT_STATUS_REJECTED ||
			!strings.Contains(reply.Results[1].Reason, "position") {
			t.Fatalf("results %v", reply.Results)
		}
		_, err = trainer.GetAnnotation(ctx, bad.AnnotationId)
		wantCode(t, err, codes.NotFound)
	})

	t.Run("withdraw", func(t *testing.T) {
		id := runID + "-withdraw"
		if _, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{annotated(id, sample)}, false); err != nil {
			t.Fatal(err)
		}
		reply, err := trainer.WithdrawAnnotations(ctx, []string{id, runID + "-never-stored"})
		if err != nil || reply.Withdrawn != 1 || len(reply.UnknownIds) != 1 || reply.UnknownIds[0] != runID+"-never-stored" {
			t.Fatalf("withdraw: %v %v", reply, err)
		}
		stored, err := trainer.GetAnnotation(ctx, id)
		if err != nil || stored.State != v1.AnnotationState_ANNOTATION_STATE_WITHDRAWN {
			t.Fatalf("state: %v %v", stored.GetState(), err)
		}
	})

	t.Run("train two steps and publish", func(t *testing.T) {
		if _, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{annotated(runID+"-train", sample)}, false); err != nil {
			t.Fatal(err)
		}
		before, err := trainer.GetStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		progress, err := trainer.Train(ctx, &v1.TrainRequest{Steps: 2}).All()
		if err != nil {
			t.Fatal(err)
		}
		done := progress[len(progress)-1]
		if len(progress) != 3 || !done.Done {
			t.Fatalf("progress %v", progress)
		}
		for _, p := range progress[:2] {
			if p.TotalSteps != 2 || math.IsNaN(p.Loss) || math.IsInf(p.Loss, 0) || p.Rows <= 0 {
				t.Fatalf("step %v", p)
			}
		}
		status, err := trainer.GetStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		info, err := policy.GetModelInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if status.Step != before.Step+2 || status.ModelVersion <= before.ModelVersion || done.PublishedVersion != status.ModelVersion ||
			info.ModelVersion != status.ModelVersion {
			t.Fatalf("before %v\nafter %v\ndone %v\npolicy version %d", before, status, done, info.ModelVersion)
		}
	})
}
