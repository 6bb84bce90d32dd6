package tokenfeedback

import (
	"context"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"
	v1 "tokenfeedback.dev/clients/go/tokenfeedbackv1"
)

// PolicyClient calls tokenfeedback.v1.PolicyService: requests and replies are the generated
// messages, errors are *Error.
type PolicyClient struct {
	*Conn
	// Stub is the generated client, for anything this one does not wrap.
	Stub v1.PolicyServiceClient
}

const policyService = "tokenfeedback.v1.PolicyService/"

// DialPolicy connects to a policy server (see Dial).
func DialPolicy(address string, options *Options) (*PolicyClient, error) {
	conn, err := Dial(address, options)
	if err != nil {
		return nil, err
	}
	return &PolicyClient{Conn: conn, Stub: v1.NewPolicyServiceClient(conn.CC)}, nil
}

// Generate samples a completion: a start event, one token event per sampled token, then an end
// event (GenerateEvent.GetStart/GetToken/GetEnd). Nothing happens on the server before the first
// event, so the stream is retried on UNAVAILABLE until then.
func (p *PolicyClient) Generate(ctx context.Context, request *v1.GenerateRequest) *Stream[*v1.GenerateEvent] {
	return newStream(ctx, p.Conn, policyService+"Generate", true,
		func(ctx context.Context) (func() (*v1.GenerateEvent, error), error) {
			stream, err := p.Stub.Generate(ctx, request)
			if err != nil {
				return nil, err
			}
			return stream.Recv, nil
		})
}

// Completion is a finished generation: its start event, every token event in order, its end event.
type Completion struct {
	Start  *v1.GenerationStart
	Tokens []*v1.TokenEvent
	End    *v1.GenerationEnd
}

// Complete generates and collects the whole stream.
func (p *PolicyClient) Complete(ctx context.Context, request *v1.GenerateRequest) (*Completion, error) {
	stream := p.Generate(ctx, request)
	defer stream.Close()
	var c Completion
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		switch e := event.Event.(type) {
		case *v1.GenerateEvent_Start:
			c.Start = e.Start
		case *v1.GenerateEvent_Token:
			c.Tokens = append(c.Tokens, e.Token)
		case *v1.GenerateEvent_End:
			c.End = e.End
		}
	}
	if c.Start == nil || c.End == nil {
		return nil, NewError(codes.Internal, fmt.Sprintf("Generate stream ended without its start or end event (start %v, end %v)",
			c.Start != nil, c.End != nil), policyService+"Generate", p.Address)
	}
	return &c, nil
}

// Score returns teacher-forced log-probabilities of given completion tokens after a prompt.
func (p *PolicyClient) Score(ctx context.Context, request *v1.ScoreRequest) (reply *v1.ScoreResponse, err error) {
	err = p.unary(ctx, policyService+"Score", true, func(ctx context.Context) (e error) {
		reply, e = p.Stub.Score(ctx, request)
		return e
	})
	return reply, err
}

// Tokenize turns text into tokens with character offsets, or token ids into text pieces.
func (p *PolicyClient) Tokenize(ctx context.Context, request *v1.TokenizeRequest) (reply *v1.TokenizeResponse, err error) {
	err = p.unary(ctx, policyService+"Tokenize", true, func(ctx context.Context) (e error) {
		reply, e = p.Stub.Tokenize(ctx, request)
		return e
	})
	return reply, err
}

// AlignSpans says which tokens each character span covers.
func (p *PolicyClient) AlignSpans(ctx context.Context, request *v1.AlignSpansRequest) (reply *v1.AlignSpansResponse, err error) {
	err = p.unary(ctx, policyService+"AlignSpans", true, func(ctx context.Context) (e error) {
		reply, e = p.Stub.AlignSpans(ctx, request)
		return e
	})
	return reply, err
}

// GetModelInfo returns the model name, vocabulary, special tokens, limits and current version.
func (p *PolicyClient) GetModelInfo(ctx context.Context) (reply *v1.ModelInfo, err error) {
	err = p.unary(ctx, policyService+"GetModelInfo", true, func(ctx context.Context) (e error) {
		reply, e = p.Stub.GetModelInfo(ctx, &v1.GetModelInfoRequest{})
		return e
	})
	return reply, err
}

// UpdateWeights sends a weight update (header, chunks, commit) produced by next, which returns
// io.EOF after the last message. Needs an admin token when auth is on. Never retried.
func (p *PolicyClient) UpdateWeights(ctx context.Context, next func() (*v1.WeightUpdateMessage, error)) (*v1.UpdateWeightsResponse, error) {
	const method = policyService + "UpdateWeights"
	_, timed := ctx.Deadline()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := p.Stub.UpdateWeights(ctx)
	if err != nil {
		return nil, wrapError(err, method, p.Address, timed)
	}
	for {
		message, err := next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err // cancel() abandons the update: the server changes nothing
		}
		if err := stream.Send(message); err != nil {
			if err == io.EOF {
				break // the server ended the call: its status comes from CloseAndRecv
			}
			return nil, wrapError(err, method, p.Address, timed)
		}
	}
	reply, err := stream.CloseAndRecv()
	return reply, wrapError(err, method, p.Address, timed)
}
