// Command example is the feedback loop in one program: generate a completion, mark its least
// probable token bad (naming the model's own favourite at that position as the replacement),
// submit the annotation, and train one step.
//
//	example [-policy HOST:PORT] [-trainer HOST:PORT] [-prompt TEXT]
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
	prompt := flag.String("prompt", "The capital of Canada is", "prompt text")
	flag.Parse()
	if err := run(*policyAddr, *trainerAddr, *prompt); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(policyAddr, trainerAddr, prompt string) error {
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

	// 1. Generate.
	completion, err := policy.Complete(ctx, &v1.GenerateRequest{
		PromptText: prompt,
		Params:     &v1.SamplingParams{MaxNewTokens: 12, Temperature: proto.Float32(1), NumAlternatives: 5, Seed: proto.Uint64(7)},
	})
	if err != nil {
		return err
	}
	fmt.Printf("prompt:     %q (model version %d)\n", completion.Start.PromptText, completion.Start.ModelVersion)
	fmt.Printf("completion: %q\n", completion.End.CompletionText)
	if len(completion.Tokens) == 0 {
		return fmt.Errorf("the model generated no tokens")
	}

	// 2. The least probable token is the one to mark bad.
	worst := completion.Tokens[0]
	for _, token := range completion.Tokens[1:] {
		if token.Logprob < worst.Logprob {
			worst = token
		}
	}
	label := &v1.TokenLabel{Position: worst.Position, Weight: -1}
	fmt.Printf("worst token: #%d %q logprob %.3f", worst.Position, worst.Text, worst.Logprob)
	for _, alt := range worst.Alternatives {
		if alt.TokenId != worst.TokenId {
			label.ReplacementTokenId = proto.Int32(alt.TokenId)
			fmt.Printf("; replacement %q (%.3f)", alt.Text, alt.Logprob)
			break
		}
	}
	fmt.Println()

	// 3. Submit the annotation (the sampled ids are the truth; the behavior logprobs let the
	//    trainer correct for sampling).
	ids := make([]int32, len(completion.Tokens))
	behavior := make([]float32, len(completion.Tokens))
	for i, token := range completion.Tokens {
		ids[i], behavior[i] = token.TokenId, token.SamplingLogprob
	}
	id := "example-go-" + randomHex(8)
	reply, err := trainer.SubmitAnnotations(ctx, []*v1.AnnotatedSequence{{
		AnnotationId:       id,
		PromptTokenIds:     completion.Start.PromptTokenIds,
		CompletionTokenIds: ids,
		ModelVersion:       completion.Start.ModelVersion,
		BehaviorLogprobs:   behavior,
		TokenLabels:        []*v1.TokenLabel{label},
		AnnotatorId:        "clients/go/cmd/example",
	}}, false)
	if err != nil {
		return err
	}
	result := reply.Results[0]
	fmt.Printf("submitted %s: status %d rows %d\n", id, result.Status, result.Rows)

	// 4. Train one step and show its progress.
	stream := trainer.Train(ctx, &v1.TrainRequest{Steps: 1})
	defer stream.Close()
	for {
		progress, err := stream.Recv()
		if err == io.EOF {
			return nil
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
