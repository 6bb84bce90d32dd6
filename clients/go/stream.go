package tokenfeedback

import (
	"context"
	"io"
)

// Stream is a server stream of T: call Recv until it returns io.EOF (the stream ended normally) or
// an *Error. Close cancels the call (on the server too: a cancelled Generate frees its decoding
// slot at once); call it when leaving early, it is harmless after the end.
type Stream[T any] struct {
	conn       *Conn
	method     string
	idempotent bool
	ctx        context.Context
	cancel     context.CancelFunc
	open       func(ctx context.Context) (func() (T, error), error)
	recv       func() (T, error)
	received   bool
	retry      int
	done       bool
}

func newStream[T any](ctx context.Context, conn *Conn, method string, idempotent bool,
	open func(ctx context.Context) (func() (T, error), error)) *Stream[T] {
	ctx, cancel := context.WithCancel(ctx)
	return &Stream[T]{conn: conn, method: method, idempotent: idempotent, ctx: ctx, cancel: cancel, open: open}
}

// Recv returns the next message, io.EOF after the last one, or an *Error. An idempotent stream
// is retried on UNAVAILABLE only before its first message.
func (s *Stream[T]) Recv() (T, error) {
	var zero T
	if s.done {
		return zero, io.EOF
	}
	for {
		var err error
		if s.recv == nil {
			s.recv, err = s.open(s.ctx)
		}
		if err == nil {
			var msg T
			msg, err = s.recv()
			if err == nil {
				s.received = true
				return msg, nil
			}
			if err == io.EOF {
				s.Close()
				return zero, io.EOF
			}
		}
		_, timed := s.ctx.Deadline()
		err = wrapError(err, s.method, s.conn.Address, timed)
		if !s.received && s.conn.shouldRetry(s.ctx, err, s.idempotent, s.retry) {
			s.retry++
			s.recv = nil
			continue
		}
		s.Close()
		return zero, err
	}
}

// All reads the rest of the stream.
func (s *Stream[T]) All() ([]T, error) {
	var all []T
	for {
		msg, err := s.Recv()
		if err == io.EOF {
			return all, nil
		}
		if err != nil {
			return all, err
		}
		all = append(all, msg)
	}
}

// Close cancels the call if it is still running.
func (s *Stream[T]) Close() {
	s.done = true
	s.cancel()
}
