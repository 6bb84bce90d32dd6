"""The labeling config that ships with the Label Studio backend (`tokenfeedback labelstudio-config`).

A task is a model completion: `prompt` (shown, not labeled) and `completion` (labeled). The
annotator selects characters of the completion and labels them Bad or Good; a Bad span can carry
the text that should replace it in a per-region text area. The backend and the conversion find the
results by these tag names, so a project that renames them must say so (see LabelNames). A header
shows data.tokenfeedback_error, where the backend writes why it could not store an annotation of
the task (empty, so invisible, otherwise; a task needs no such field to be imported).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from xml.etree import ElementTree

from tokenfeedback.labelstudio.rest import ERROR_KEY


@dataclass(frozen=True)
class LabelNames:
    """Tag names of the shipped config; the conversion reads results by them."""

    prompt: str = "prompt"  # <Text> showing data.prompt
    completion: str = "completion"  # <Text> showing data.completion, the labeled text
    labels: str = "label"  # <Labels> with the span labels
    replacement: str = "replacement"  # per-region <TextArea> for a Bad span's replacement text
    bad: str = "Bad"  # label value of a wrong span (weight -1)
    good: str = "Good"  # label value of a right span (weight +1)
    completion_key: str = "completion"  # task data key the completion <Text> shows ($completion)


NAMES = LabelNames()

LABEL_CONFIG = f"""<View>
  <Header value="Prompt"/>
  <Text name="{NAMES.prompt}" value="$prompt"/>
  <Header value="Completion: select the wrong text and label it Bad (or the right text, Good)"/>
  <Header value="${ERROR_KEY}" size="5" style="color: #c62828"/>
  <Labels name="{NAMES.labels}" toName="{NAMES.completion}" choice="single">
    <Label value="{NAMES.bad}" background="#e5484d" hotkey="b"/>
    <Label value="{NAMES.good}" background="#30a46c" hotkey="g"/>
  </Labels>
  <Text name="{NAMES.completion}" value="$completion"/>
  <View visibleWhen="region-selected" whenTagName="{NAMES.labels}" whenLabelValue="{NAMES.bad}">
    <Header value="What should this Bad span say instead? (optional)"/>
    <TextArea name="{NAMES.replacement}" toName="{NAMES.completion}" perRegion="true" editable="true"
              maxSubmissions="1" rows="1" placeholder="replacement text, e.g. France"/>
  </View>
</View>
"""


@functools.lru_cache(maxsize=64)
def names_from_config(xml: str) -> LabelNames:
    """The tag names of a project's own labeling config, so predictions fit a config that names
    its tags differently (e.g. `<Text name="text" value="$text"/>`): the first <Labels> with a
    Bad label, the <Text> it labels, and a per-region <TextArea> on that text. The shipped names
    where the config has no such tags (or does not parse)."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return NAMES
    for labels in root.iter("Labels"):
        values = [label.get("value", "") for label in labels.iter("Label")]
        bad = next((v for v in values if v.lower() == NAMES.bad.lower()), None)
        target = labels.get("toName", "")
        text = next((t for t in root.iter("Text") if t.get("name") == target), None)
        if bad is None or text is None or not text.get("value", "").startswith("$"):
            continue
        good = next((v for v in values if v.lower() == NAMES.good.lower()), NAMES.good)
        areas = [a.get("name", "") for a in root.iter("TextArea")
                 if a.get("toName") == target and a.get("perRegion") == "true"]
        prompt = next((t.get("name", "") for t in root.iter("Text") if t.get("value") == "$prompt"), NAMES.prompt)
        return LabelNames(prompt=prompt, completion=target, labels=labels.get("name", NAMES.labels),
                          replacement=areas[0] if areas else NAMES.replacement, bad=bad, good=good,
                          completion_key=text.get("value")[1:])
    return NAMES


def label_config() -> str:
    """The labeling config XML to paste into a project's Settings -> Labeling Interface -> Code."""
    return LABEL_CONFIG
