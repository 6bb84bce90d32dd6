package tokenfeedback

// Typed errors: every failed RPC comes back as an *Error carrying the gRPC status code, the
// server's message, the method and the address, so callers can write
//
//	var e *tokenfeedback.Error
//	if errors.As(err, &e) && e.Code == codes.InvalidArgument { ... e.Field ... }
//
// or simply status.Code(err) (an *Error is a gRPC status error too). Field is the field the server
// named: its messages start "field.path: what went wrong". The same shape as the Python client's
// TokenfeedbackError (clients/python/tokenfeedback/errors.py) and the TypeScript client's.

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// "sequences[0].token_labels[1].weight: must be finite, got nan" -> "sequences[0].token_labels[1].weight";
// a segment may carry a note in parentheses, dropped from the field:
// "sequences[0] (annotation_id='a').token_labels[0].weight: ..." -> "sequences[0].token_labels[0].weight".
const fieldSegment = `[A-Za-z_]\w*(?:\[\d+\])?(?: \([^()]*\))?`

var (
	fieldPattern = regexp.MustCompile(`^(` + fieldSegment + `(?:\.` + fieldSegment + `)*): `)
	notePattern  = regexp.MustCompile(` \([^()]*\)`)
)

// Error is a failed call.
type Error struct {
	// Code is the gRPC status code (codes.InvalidArgument, codes.Unavailable, ...).
	Code codes.Code
	// Message is the server's message (or the client's, for connection failures).
	Message string
	// Method is the RPC, e.g. "tokenfeedback.v1.PolicyService/Generate".
	Method string
	// Address is where the call was sent.
	Address string
	// Field is the field the server named, or "" when its message names none.
	Field string
}

// NewError builds an *Error, parsing the field name from the message.
func NewError(code codes.Code, message, method, address string) *Error {
	e := &Error{Code: code, Message: message, Method: method, Address: address}
	if m := fieldPattern.FindStringSubmatch(message); m != nil {
		e.Field = notePattern.ReplaceAllString(m[1], "")
	}
	return e
}

// CodeName is the status name as the test vectors and the other clients write it: "INVALID_ARGUMENT".
func (e *Error) CodeName() string { return CodeName(e.Code) }

func (e *Error) Error() string {
	var where []string
	if e.Method != "" {
		where = append(where, e.Method)
	}
	if e.Address != "" {
		where = append(where, "at "+e.Address)
	}
	s := e.CodeName() + ": " + e.Message
	if len(where) > 0 {
		s += " (" + strings.Join(where, " ") + ")"
	}
	return s
}

// GRPCStatus lets status.Code(err) and status.FromError(err) see the code.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

// Is makes errors.Is(err, context.DeadlineExceeded) and errors.Is(err, context.Canceled) true for
// the matching codes.
func (e *Error) Is(target error) bool {
	switch target {
	case context.DeadlineExceeded:
		return e.Code == codes.DeadlineExceeded
	case context.Canceled:
		return e.Code == codes.Canceled
	}
	return false
}

// CodeName turns codes.InvalidArgument into "INVALID_ARGUMENT" (grpc-go's String() gives
// "InvalidArgument").
func CodeName(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// CodeOf is the status code of any error: an *Error's code, a gRPC status's, codes.OK for nil.
func CodeOf(err error) codes.Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return status.Code(err)
}

// transportPattern matches UNAVAILABLE messages that come from the transport (as opposed to a
// server saying it is not ready).
var transportPattern = regexp.MustCompile(`(?i)connect|dns|resolv|socket|unreachable|handshake|ssl|tls|refused|reset|transport`)

// wrapError turns what a grpc-go call returned into an *Error (nil stays nil).
func wrapError(err error, method, address string, timeout bool) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	st, ok := status.FromError(err)
	if !ok {
		// A context error before the call started, or anything else that is not a status.
		st = status.FromContextError(err)
	}
	message := st.Message()
	switch {
	case st.Code() == codes.DeadlineExceeded && timeout:
		message += " (no answer within the call's deadline)"
	case st.Code() == codes.Unavailable && transportPattern.MatchString(message):
		message = "cannot reach a server at " + address + ": " + message
	}
	return NewError(st.Code(), message, method, address)
}
