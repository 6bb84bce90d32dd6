package tokenfeedback

// The cross-language annotation vectors (tests/vectors/annotations.json, format in README.md
// there), submitted through TrainerClient to a real trainer on the demo model: every acceptance,
// rejection and stored row must be as the vectors say, as for the Python and TypeScript clients.
// The harness sets TOKENFEEDBACK_VECTORS to the file when the servers run the demo model.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	v1 "tokenfeedback.dev/clients/go/tokenfeedbackv1"
)

const weightTolerance = 1e-9

type vectorRow struct {
	Position    int32   `json:"position"`
	TokenID     int32   `json:"tokenId"`
	Weight      float64 `json:"weight"`
	Replacement bool    `json:"replacement"`
}

type vectorCase struct {
	Name  string `json:"name"`
	Steps []struct {
		Request json.RawMessage `json:"request"`
		Expect  struct {
			Results []struct {
				AnnotationID   string   `json:"annotationId"`
				Status         string   `json:"status"`
				Rows           *int32   `json:"rows"`
				ReasonContains []string `json:"reasonContains"`
			} `json:"results"`
			Error *struct {
				Code            string   `json:"code"`
				MessageContains []string `json:"messageContains"`
			} `json:"error"`
		} `json:"expect"`
	} `json:"steps"`
	Stored []struct {
		AnnotationID       string            `json:"annotationId"`
		State              string            `json:"state"`
		PromptTokenIDs     []int32           `json:"promptTokenIds"`
		CompletionTokenIDs []int32           `json:"completionTokenIds"`
		ModelVersion       int64             `json:"modelVersion"`
		Rows               []vectorRow       `json:"rows"`
		SequenceReward     *float64          `json:"sequenceReward"`
		AnnotatorID        string            `json:"annotatorId"`
		Metadata           map[string]string `json:"metadata"`
	} `json:"stored"`
	Absent []string `json:"absent"`
}

type vectorFile struct {
	Format string `json:"format"`
	Model  struct {
		VocabSize int32 `json:"vocabSize"`
		Probe     struct {
			Text     string  `json:"text"`
			TokenIDs []int32 `json:"tokenIds"`
		} `json:"probe"`
	} `json:"model"`
	Cases []vectorCase `json:"cases"`
}

// prefixed puts the run's prefix in front of every non-empty annotation id of a request.
func prefixed(request json.RawMessage, prefix string) ([]byte, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(request, &fields); err != nil {
		return nil, err
	}
	var sequences []map[string]json.RawMessage
	if raw, ok := fields["sequences"]; ok {
		if err := json.Unmarshal(raw, &sequences); err != nil {
			return nil, err
		}
	}
	for _, sequence := range sequences {
		var id string
		if raw, ok := sequence["annotationId"]; ok && json.Unmarshal(raw, &id) == nil && id != "" {
			sequence["annotationId"], _ = json.Marshal(prefix + id)
		}
	}
	if sequences != nil {
		fields["sequences"], _ = json.Marshal(sequences)
	}
	return json.Marshal(fields)
}

func sortRows(rows []vectorRow) {
	sort.Slice(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		if a.Position != b.Position {
			return a.Position < b.Position
		}
		if a.Replacement != b.Replacement {
			return !a.Replacement
		}
		return a.TokenID < b.TokenID
	})
}

func TestVectors(t *testing.T) {
	file := os.Getenv("TOKENFEEDBACK_VECTORS")
	if file == "" {
		t.Skip("TOKENFEEDBACK_VECTORS not set (the harness sets it with servers on the demo model)")
	}
	policy, trainer := servers(t)
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var vectors vectorFile
	if err := json.Unmarshal(data, &vectors); err != nil {
		t.Fatal(err)
	}
	if vectors.Format != "tokenfeedback-annotation-vectors/1" || len(vectors.Cases) == 0 {
		t.Fatalf("format %q, %d cases", vectors.Format, len(vectors.Cases))
	}
	ctx := context.Background()
	pieces, err := policy.Tokenize(ctx, &v1.TokenizeRequest{Text: vectors.Model.Probe.Text})
	if err != nil {
		t.Fatal(err)
	}
	info, err := policy.GetModelInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]int32, len(pieces.Tokens))
	for i, piece := range pieces.Tokens {
		ids[i] = piece.TokenId
	}
	if !reflect.DeepEqual(ids, vectors.Model.Probe.TokenIDs) || info.VocabSize != vectors.Model.VocabSize {
		t.Fatalf("the vectors were generated for another tokenizer (probe ids %v vs %v, vocab %d vs %d): rebuild them with tests/vectors/generate.py",
			ids, vectors.Model.Probe.TokenIDs, info.VocabSize, vectors.Model.VocabSize)
	}
	random := make([]byte, 4)
	if _, err := rand.Read(random); err != nil {
		t.Fatal(err)
	}
	prefix := fmt.Sprintf("go-%s-%s-", time.Now().UTC().Format("20060102150405"), hex.EncodeToString(random))

	stored := 0
	for _, vector := range vectors.Cases {
		stored += len(vector.Stored)
		vector := vector
		t.Run(vector.Name, func(t *testing.T) { runVector(t, ctx, trainer, vector, prefix) })
	}
	status, err := trainer.GetStatus(ctx)
	if err != nil || status.AnnotationsTotal < int64(stored) || status.Training {
		t.Fatalf("after the vectors: %v %v", status, err)
	}
}

func runVector(t *testing.T, ctx context.Context, trainer *TrainerClient, vector vectorCase, prefix string) {
	for number, step := range vector.Steps {
		where := fmt.Sprintf("%s step %d", vector.Name, number)
		body, err := prefixed(step.Request, prefix)
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		var request v1.SubmitAnnotationsRequest
		if err := protojson.Unmarshal(body, &request); err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		reply, err := trainer.SubmitAnnotations(ctx, request.Sequences, request.PartialOk)
		if wanted := step.Expect.Error; wanted != nil {
			var e *Error
			if !errors.As(err, &e) || e.CodeName() != wanted.Code {
				t.Fatalf("%s: want %s, got %v", where, wanted.Code, err)
			}
			for _, text := range wanted.MessageContains {
				if !strings.Contains(e.Message, text) {
					t.Fatalf("%s: %q not in %q", where, text, e.Message)
				}
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		if len(reply.Results) != len(step.Expect.Results) {
			t.Fatalf("%s: %d results, want %d", where, len(reply.Results), len(step.Expect.Results))
		}
		for i, wanted := range step.Expect.Results {
			result := reply.Results[i]
			if result.AnnotationId != prefix+wanted.AnnotationID || v1.SubmitStatus_name[int32(result.Status)] != wanted.Status {
				t.Fatalf("%s: result %v, want %s %s", where, result, wanted.AnnotationID, wanted.Status)
			}
			if wanted.Rows != nil && result.Rows != *wanted.Rows {
				t.Fatalf("%s: %s rows %d, want %d", where, result.AnnotationId, result.Rows, *wanted.Rows)
			}
			for _, text := range wanted.ReasonContains {
				if !strings.Contains(result.Reason, text) {
					t.Fatalf("%s: %q not in %q", where, text, result.Reason)
				}
			}
		}
	}
	for _, wanted := range vector.Stored {
		where := fmt.Sprintf("%s: stored %s", vector.Name, wanted.AnnotationID)
		stored, err := trainer.GetAnnotation(ctx, prefix+wanted.AnnotationID)
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		if v1.AnnotationState_name[int32(stored.State)] != wanted.State ||
			!equalIDs(stored.PromptTokenIds, wanted.PromptTokenIDs) || !equalIDs(stored.CompletionTokenIds, wanted.CompletionTokenIDs) ||
			stored.ModelVersion != wanted.ModelVersion || stored.AnnotatorId != wanted.AnnotatorID ||
			!reflect.DeepEqual(nonNil(stored.Metadata), nonNil(wanted.Metadata)) {
			t.Fatalf("%s: got %v", where, stored)
		}
		if (stored.SequenceReward == nil) != (wanted.SequenceReward == nil) ||
			(wanted.SequenceReward != nil && *stored.SequenceReward != *wanted.SequenceReward) {
			t.Fatalf("%s: sequence reward %v, want %v", where, stored.SequenceReward, wanted.SequenceReward)
		}
		got := make([]vectorRow, len(stored.Rows))
		for i, r := range stored.Rows {
			got[i] = vectorRow{r.Position, r.TokenId, r.Weight, r.Replacement}
		}
		want := append([]vectorRow(nil), wanted.Rows...)
		sortRows(got)
		sortRows(want)
		if len(got) != len(want) {
			t.Fatalf("%s: rows %v, want %v", where, got, want)
		}
		for i := range got {
			if got[i].Position != want[i].Position || got[i].TokenID != want[i].TokenID || got[i].Replacement != want[i].Replacement ||
				math.Abs(got[i].Weight-want[i].Weight) > weightTolerance {
				t.Fatalf("%s: rows %v, want %v", where, got, want)
			}
		}
	}
	for _, id := range vector.Absent {
		// not stored: NOT_FOUND, or INVALID_ARGUMENT for an id no annotation can have (too long)
		_, err := trainer.GetAnnotation(ctx, prefix+id)
		var e *Error
		tooLong := CodeOf(err) == codes.InvalidArgument && errors.As(err, &e) && e.Field == "annotation_id" && len(prefix+id) > 200
		if CodeOf(err) != codes.NotFound && !tooLong {
			t.Fatalf("%s: %s should be absent, got %v", vector.Name, id, err)
		}
	}
}

func equalIDs(a, b []int32) bool {
	return len(a) == len(b) && (len(a) == 0 || reflect.DeepEqual(a, b))
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}
