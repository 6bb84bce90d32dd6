package tokenfeedback

import (
	"context"

	v1 "tokenfeedback.dev/clients/go/tokenfeedbackv1"
)

// TrainerClient calls tokenfeedback.v1.TrainerService: requests and replies are the generated
// messages, errors are *Error.
type TrainerClient struct {
	*Conn
	// Stub is the generated client, for anything this one does not wrap.
	Stub v1.TrainerServiceClient
}

const trainerService = "tokenfeedback.v1.TrainerService/"

// DialTrainer connects to a trainer (see Dial).
func DialTrainer(address string, options *Options) (*TrainerClient, error) {
	conn, err := Dial(address, options)
	if err != nil {
		return nil, err
	}
	return &TrainerClient{Conn: conn, Stub: v1.NewTrainerServiceClient(conn.CC)}, nil
}

// SubmitAnnotations validates and stores annotated sequences: one result per sequence, in order.
// With partialOK, invalid sequences are answered REJECTED instead of failing the call. Retried on
// UNAVAILABLE: an annotation id makes a resend harmless (DUPLICATE).
func (t *TrainerClient) SubmitAnnotations(ctx context.Context, sequences []*v1.AnnotatedSequence, partialOK bool) (reply *v1.SubmitAnnotationsResponse, err error) {
	request := &v1.SubmitAnnotationsRequest{Sequences: sequences, PartialOk: partialOK}
	err = t.unary(ctx, trainerService+"SubmitAnnotations", true, func(ctx context.Context) (e error) {
		reply, e = t.Stub.SubmitAnnotations(ctx, request)
		return e
	})
	return reply, err
}

// WithdrawAnnotations marks stored annotations withdrawn; unknown ids are reported, not an error.
func (t *TrainerClient) WithdrawAnnotations(ctx context.Context, ids []string) (reply *v1.WithdrawAnnotationsResponse, err error) {
	err = t.unary(ctx, trainerService+"WithdrawAnnotations", true, func(ctx context.Context) (e error) {
		reply, e = t.Stub.WithdrawAnnotations(ctx, &v1.WithdrawAnnotationsRequest{AnnotationIds: ids})
		return e
	})
	return reply, err
}

// GetAnnotation reads back one stored annotation with its training rows (NOT_FOUND when unknown).
func (t *TrainerClient) GetAnnotation(ctx context.Context, id string) (reply *v1.StoredAnnotation, err error) {
	err = t.unary(ctx, trainerService+"GetAnnotation", true, func(ctx context.Context) (e error) {
		reply, e = t.Stub.GetAnnotation(ctx, &v1.GetAnnotationRequest{AnnotationId: id})
		return e
	})
	return reply, err
}

// Train runs optimizer steps: one progress message per step, then a final one with Done set.
// Needs an admin token when auth is on. Not retried (steps change the model).
func (t *TrainerClient) Train(ctx context.Context, request *v1.TrainRequest) *Stream[*v1.TrainProgress] {
	return newStream(ctx, t.Conn, trainerService+"Train", false,
		func(ctx context.Context) (func() (*v1.TrainProgress, error), error) {
			stream, err := t.Stub.Train(ctx, request)
			if err != nil {
				return nil, err
			}
			return stream.Recv, nil
		})
}

// SaveCheckpoint writes a checkpoint now (admin token when auth is on). Not retried.
func (t *TrainerClient) SaveCheckpoint(ctx context.Context) (reply *v1.SaveCheckpointResponse, err error) {
	err = t.unary(ctx, trainerService+"SaveCheckpoint", false, func(ctx context.Context) (e error) {
		reply, e = t.Stub.SaveCheckpoint(ctx, &v1.SaveCheckpointRequest{})
		return e
	})
	return reply, err
}

// GetStatus returns counts, versions, last losses, and the version each policy server holds.
func (t *TrainerClient) GetStatus(ctx context.Context) (reply *v1.TrainerStatus, err error) {
	err = t.unary(ctx, trainerService+"GetStatus", true, func(ctx context.Context) (e error) {
		reply, e = t.Stub.GetStatus(ctx, &v1.GetStatusRequest{})
		return e
	})
	return reply, err
}
