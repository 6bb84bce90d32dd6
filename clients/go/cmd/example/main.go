// Command example is the feedback loop in one program, on a completion it KNOWS is wrong: score
// "Paris is the capital of" + " Canada." (a false fact), mark the token where it goes wrong
// (" Canada") bad with the right token (" France") as its replacement, submit the annotation,
// train one step, and score again. It never marks a token of the model's own output, whose
// errors it cannot know: an example that guesses (say, "the least likely token is wrong") can
// mark a right answer bad, and its annotation stays in the trainer's store and is replayed by
// later training.
//
//	example [-policy HOST:PORT] [-trainer HOST:PORT]
//
// Addresses default to $TOKENFEEDBACK_POLICY_ADDR / $TOKENFEEDBACK_TRAINER_ADDR, then
// $TOKENFEEDBACK_POLICY / $TOKENFEEDBACK_TRAINER (what `tokenfeedback serve` prints), then
// 127.0.0.1:50051 / 127.0.0.1:50052 (where it binds). With auth and TLS on, set
// $TOKENFEEDBACK_TOKEN (an admin token: Train needs one) and $TOKENFEEDBACK_CA (roots PEM file).
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/protobuf/proto"
	tokenfeedback "tokenfeedback.dev/clients/go"
	v1 "tokenfeedback.dev/clients/go/tokenfeedbackv1"
)

func main() {
	policyAddr := flag.String("policy", firstSet("TOKENFEEDBACK_POLICY_ADDR", "TOKENFEEDBACK_POLICY", "127.0.0.1:50051"), "policy server HOST:PORT")
	trainerAddr := flag.String("trainer", firstSet("TOKENFEEDBACK_TRAINER_ADDR", "TOKENFEEDBACK_TRAINER", "127.0.0.1:50052"), "trainer HOST:PORT")
	flag.Parse()
	if err := run(*policyAddr, *trainerAddr); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

const (
	prompt = "Paris is the capital of"
	wrong  = " Canada." // the false completion this example corrects
	right  = " France." // what it should say
)

func run(policyAddr, trainerAddr string) error {
	options := &tokenfeedback.Options{Token: os.Getenv("TOKENFEEDBACK_TOKEN"), RootCertificatesFile: os.Getenv("TOKENFEEDBACK_CA")}
	policy, err := tokenfeedback.DialPolicy(policyAddr, options)
	if err != nil {
		return err
	}
	defer policy.Close()
	trainer, err := tokenfeedback.DialTrainer(trainerAddr, options)
	if err != nil {
		return err
	}
	defer trainer.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// 1. Score the wrong completion and the right one (teacher forcing: the model's logprob of
	//    each given token). The first position where their tokens differ is where the wrong one
	//    goes wrong; the right one's token there is the replacement.
	scoredWrong, err := policy.Score(ctx, &v1.ScoreRequest{PromptText: prompt, CompletionText: wrong})
	if err != nil {
		return err
	}
	scoredRight, err := policy.Score(ctx, &v1.ScoreRequest{PromptText: prompt, CompletionText: right})
	if err != nil {
		return err
	}
	at := -1
	for i, token := range scoredWrong.Tokens {
		if i >= len(scoredRight.Tokens) || token.TokenId != scoredRight.Tokens[i].TokenId {
			at = i
			break
		}
	}
	if at < 0 {
		return fmt.Errorf("%q and %q tokenize alike", wrong, right)
	}
	bad, replacement := scoredWrong.Tokens[at], scoredRight.Tokens[at]
	fmt.Printf("prompt:     %q (model version %d)\n", prompt, scoredWrong.ModelVersion)
	fmt.Printf("completion: %q (known to be wrong)\n", scoredWrong.CompletionText)
	fmt.Printf("bad token:  #%d %q id %d logprob %.3f; replacement %q id %d logprob %.3f\n",
		at, bad.Text, bad.TokenId, bad.Logprob, replacement.Text, replacement.TokenId, replacement.Logprob)

	// 2. Submit the annotation: the scored ids are the truth. No behavior logprobs: the
	//    completion was given, not sampled.
	wrongIDs, rightIDs := tokenIDs(scoredWrong.Tokens), tokenIDs(scoredRight.Tokens)
	id := "example-go-" + randomHex(8)
	reply, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{{
		AnnotationId:       id,
		PromptTokenIds:     scoredWrong.PromptTokenIds,
		CompletionTokenIds: wrongIDs,
		ModelVersion:       scoredWrong.ModelVersion,
		TokenLabels:        []*v1.TokenLabel{{Position: int32(at), Weight: -1, ReplacementTokenId: proto.Int32(replacement.TokenId)}},
		AnnotatorId:        "clients/go/cmd/example",
	}}, false)
	if err != nil {
		return err
	}
	result := reply.Results[0]
	fmt.Printf("submitted %s: status %d rows %d\n", id, result.Status, result.Rows)

	// 3. Train one step and show its progress.
	stream := trainer.Train(ctx, &v1.TrainRequest{Steps: 1})
	defer stream.Close()
	for {
		progress, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if progress.Done {
			fmt.Printf("done: model version %d, published %d %s\n", progress.ModelVersion, progress.PublishedVersion, progress.Message)
		} else {
			fmt.Printf("step %d/%d: loss %.4f token %.4f kl %.5f rows %d\n",
				progress.Step, progress.TotalSteps, progress.Loss, progress.TokenLoss, progress.Kl, progress.Rows)
		}
	}

	// 4. The same tokens under the weights the policy server holds now (one step moves them a
	//    little; the step's batch may hold other pending annotations too).
	badAfter, err := logprobAt(ctx, policy, scoredWrong.PromptTokenIds, wrongIDs, at)
	if err != nil {
		return err
	}
	replacementAfter, err := logprobAt(ctx, policy, scoredWrong.PromptTokenIds, rightIDs, at)
	if err != nil {
		return err
	}
	fmt.Printf("logprob of %q %.3f -> %.3f, of %q %.3f -> %.3f\n",
		bad.Text, bad.Logprob, badAfter, replacement.Text, replacement.Logprob, replacementAfter)
	return nil
}

// tokenIDs are the ids of scored tokens.
func tokenIDs(tokens []*v1.ScoredToken) []int32 {
	ids := make([]int32, len(tokens))
	for i, token := range tokens {
		ids[i] = token.TokenId
	}
	return ids
}

// logprobAt scores the completion ids after the prompt ids and returns the logprob at position at.
func logprobAt(ctx context.Context, policy *tokenfeedback.PolicyClient, promptIDs, ids []int32, at int) (float32, error) {
	scored, err := policy.Score(ctx, &v1.ScoreRequest{PromptTokenIds: promptIDs, CompletionTokenIds: ids})
	if err != nil {
		return 0, err
	}
	return scored.Tokens[at].Logprob, nil
}

// firstSet is the first of the environment variables that is set, else fallback.
func firstSet(first, second, fallback string) string {
	for _, name := range []string{first, second} {
		if value := os.Getenv(name); value != "" {
			return value
		}
	}
	return fallback
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
