package tokenfeedback

// Client behaviour that needs no server: errors, addresses, options, and failing fast when nothing
// answers at an address. The tests against real servers are in servers_test.go.

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "tokenfeedback.dev/clients/go/tokenfeedbackv1"
)

func TestErrorCarriesCodeMessageAndField(t *testing.T) {
	err := error(NewError(codes.InvalidArgument, "params.top_p: must be in (0, 1], got 1.5",
		"tokenfeedback.v1.PolicyService/Generate", "127.0.0.1:1"))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("errors.As(*Error) failed for %T", err)
	}
	if e.Code != codes.InvalidArgument || e.CodeName() != "INVALID_ARGUMENT" || e.Field != "params.top_p" {
		t.Fatalf("got code %v name %s field %q", e.Code, e.CodeName(), e.Field)
	}
	want := "INVALID_ARGUMENT: params.top_p: must be in (0, 1], got 1.5 (tokenfeedback.v1.PolicyService/Generate at 127.0.0.1:1)"
	if err.Error() != want {
		t.Fatalf("Error() = %q, want %q", err.Error(), want)
	}
	if status.Code(err) != codes.InvalidArgument || CodeOf(err) != codes.InvalidArgument {
		t.Fatalf("status.Code = %v, CodeOf = %v", status.Code(err), CodeOf(err))
	}
}

func TestFieldParsing(t *testing.T) {
	for message, field := range map[string]string{
		"sequences[0].token_labels[1].weight: must be finite, got nan":                      "sequences[0].token_labels[1].weight",
		"annotation_id: 1..200 characters":                                                  "annotation_id",
		"sequences[0] (annotation_id='x1').token_labels[0].weight: must be finite, got nan": "sequences[0].token_labels[0].weight",
		"params (a note).top_p: bad":                                                        "params.top_p",
		"no field here":                                                                     "",
		"two words: not a field":                                                            "",
	} {
		if got := NewError(codes.InvalidArgument, message, "", "").Field; got != field {
			t.Errorf("field of %q = %q, want %q", message, got, field)
		}
	}
}

func TestCodeNamesMatchTheWire(t *testing.T) {
	// The names the vectors and the other clients use are the proto enum names of google.rpc.Code.
	for code, name := range map[codes.Code]string{
		codes.Canceled: "CANCELLED", codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.Unauthenticated: "UNAUTHENTICATED",
		codes.InvalidArgument: "INVALID_ARGUMENT", codes.NotFound: "NOT_FOUND", codes.Code(99): "CODE_99",
	} {
		if got := CodeName(code); got != name {
			t.Errorf("CodeName(%d) = %s, want %s", code, got, name)
		}
	}
}

func TestWrapErrorContextErrors(t *testing.T) {
	err := wrapError(context.DeadlineExceeded, "m", "a:1", true)
	if !errors.Is(err, context.DeadlineExceeded) || CodeOf(err) != codes.DeadlineExceeded {
		t.Fatalf("deadline: got %v", err)
	}
	if !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("deadline message: %v", err)
	}
	err = wrapError(context.Canceled, "m", "a:1", false)
	if !errors.Is(err, context.Canceled) || CodeOf(err) != codes.Canceled {
		t.Fatalf("cancel: got %v", err)
	}
	if wrapError(nil, "m", "a", false) != nil {
		t.Fatal("nil must stay nil")
	}
}

func TestParseAddress(t *testing.T) {
	for address, want := range map[string]struct {
		target string
		secure bool
	}{
		"127.0.0.1:50051":            {"127.0.0.1:50051", false},
		" grpcs://example.org:443/ ": {"example.org:443", true},
		"http://localhost:8080":      {"localhost:8080", false},
		"[::1]:7":                    {"[::1]:7", false},
		"unix:/tmp/socket":           {"unix:/tmp/socket", false},
	} {
		target, secure, err := ParseAddress(address)
		if err != nil || target != want.target || secure != want.secure {
			t.Errorf("ParseAddress(%q) = %q %v %v", address, target, secure, err)
		}
	}
	for _, bad := range []string{"", "localhost", "127.0.0.1", "host:port", "a b:1", "127.0.0.1:50051/x"} {
		if _, _, err := ParseAddress(bad); err == nil {
			t.Errorf("ParseAddress(%q) accepted", bad)
		}
	}
}

func TestOptionsAreChecked(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "roots.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for what, options := range map[string]*Options{
		"token":                           {Token: "a\nb"},
		"ConnectTimeout":                  {ConnectTimeout: -time.Second},
		"Retry.Retries":                   {Retry: RetryPolicy{Retries: -1}},
		"ClientCertificate and ClientKey": {ClientCertificate: []byte("x")},
		"RootCertificatesFile":            {RootCertificatesFile: filepath.Join(dir, "missing.pem")},
		"RootCertificates":                {RootCertificatesFile: notPEM},
	} {
		_, err := Dial("127.0.0.1:1", options)
		if err == nil || !strings.Contains(err.Error(), what) {
			t.Errorf("%s: got %v", what, err)
		}
	}
}

// closedPort is a 127.0.0.1 port that nothing listens on (bound, then released).
func closedPort(t *testing.T) string {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := listener.Addr().String()
	listener.Close()
	return address
}

func TestClosedPortIsUnavailableWithinSeconds(t *testing.T) {
	address := closedPort(t)
	policy, err := DialPolicy(address, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer policy.Close()
	started := time.Now()
	_, err = policy.GetModelInfo(context.Background())
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.Unavailable {
		t.Fatalf("want UNAVAILABLE, got %v", err)
	}
	if !strings.Contains(e.Message, "cannot reach a server at "+address) {
		t.Fatalf("message: %q", e.Message)
	}
	if elapsed := time.Since(started); elapsed > 10*time.Second {
		t.Fatalf("took %v (retries included)", elapsed)
	}
}

func TestStreamToClosedPortIsUnavailable(t *testing.T) {
	trainer, err := DialTrainer(closedPort(t), &Options{Retry: NoRetry})
	if err != nil {
		t.Fatal(err)
	}
	defer trainer.Close()
	stream := trainer.Train(context.Background(), &v1.TrainRequest{Steps: 1})
	defer stream.Close()
	_, err = stream.Recv()
	if CodeOf(err) != codes.Unavailable {
		t.Fatalf("want UNAVAILABLE, got %v", err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("a failed stream must stay ended, got %v", err)
	}
}

func TestSilentAddressFailsAfterConnectTimeout(t *testing.T) {
	// 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never routed. Either the connection attempt hangs
	// (then the connect timeout ends it) or the network refuses it at once.
	policy, err := DialPolicy("192.0.2.1:9", &Options{ConnectTimeout: 500 * time.Millisecond, Retry: NoRetry, Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer policy.Close()
	started := time.Now()
	_, err = policy.GetModelInfo(context.Background())
	if CodeOf(err) != codes.Unavailable {
		t.Fatalf("want UNAVAILABLE, got %v", err)
	}
	if elapsed := time.Since(started); elapsed > 5*time.Second {
		t.Fatalf("took %v", elapsed)
	}
}

func TestContextDeadlineBeatsConnectTimeout(t *testing.T) {
	policy, err := DialPolicy("192.0.2.1:9", &Options{Retry: NoRetry})
	if err != nil {
		t.Fatal(err)
	}
	defer policy.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = policy.GetModelInfo(ctx)
	// Unreachable networks refuse at once (UNAVAILABLE); a silent one runs into the deadline.
	if code := CodeOf(err); code != codes.DeadlineExceeded && code != codes.Unavailable {
		t.Fatalf("want DEADLINE_EXCEEDED or UNAVAILABLE, got %v", err)
	}
}
