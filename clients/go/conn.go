// Package tokenfeedback is the Go client of tokenfeedback's policy and trainer services
// (tokenfeedback.v1): typed errors, TLS roots, bearer tokens, deadlines and retries over the stubs
// protoc-gen-go and protoc-gen-go-grpc generate from proto/ (package tokenfeedbackv1).
//
//	policy, err := tokenfeedback.DialPolicy("127.0.0.1:50051", nil)
//	completion, err := policy.Complete(ctx, &v1.GenerateRequest{PromptText: "The capital of"})
package tokenfeedback

// One gRPC connection with the client's connection policy, shared by both clients:
// - TLS roots (PEM bytes or a file) and an optional client certificate, or plaintext;
// - a bearer token sent as `authorization: Bearer <token>` on every call, unary and streaming alike
//   (per-RPC credentials, so streams get it too);
// - a connect deadline: a connection attempt that gets no answer gives up after ConnectTimeout
//   and the calls waiting on it fail with UNAVAILABLE; a refused connection fails at once;
// - a default deadline for unary calls, and retries with exponential backoff on UNAVAILABLE for
//   calls that are safe to repeat; never for anything else.
// The policy mirrors the Python client's (clients/python/tokenfeedback/connection.py).

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
)

// RetryPolicy is exponential backoff for UNAVAILABLE on idempotent calls: retry k (1-based) first
// waits min(MaxBackoff, InitialBackoff * Multiplier^(k-1)) * (1 +- Jitter).
type RetryPolicy struct {
	Retries        int           // retries after the first attempt; 0 disables retrying
	InitialBackoff time.Duration // wait before the first retry
	Multiplier     float64       // growth of the wait per retry
	MaxBackoff     time.Duration // cap on one wait
	Jitter         float64       // the wait is scaled by a random factor in [1 - Jitter, 1 + Jitter]
}

// DefaultRetry is what a zero Options.Retry means.
var DefaultRetry = RetryPolicy{Retries: 4, InitialBackoff: 100 * time.Millisecond, Multiplier: 2, MaxBackoff: 2 * time.Second, Jitter: 0.2}

// NoRetry turns retrying off.
var NoRetry = RetryPolicy{Retries: 0, InitialBackoff: time.Millisecond, Multiplier: 1, MaxBackoff: time.Millisecond}

// Options configure a connection. The zero value (or nil) is plaintext, no token, a 30 s deadline
// for unary calls, a 5 s connect timeout and DefaultRetry.
type Options struct {
	// RootCertificates: PEM root certificates the server's certificate must chain to. Implies TLS.
	RootCertificates []byte
	// RootCertificatesFile: the same, read from a file.
	RootCertificatesFile string
	// TLS with the system's roots when no roots are given (also implied by a grpcs:// address).
	TLS bool
	// ClientCertificate and ClientKey (PEM): for servers that verify clients; both or neither.
	ClientCertificate, ClientKey []byte
	// TLSServerName: the name to check the server's certificate against, when it differs from the host.
	TLSServerName string
	// Token: bearer token sent on every call (roles annotator and admin, when the servers have auth on).
	Token string
	// Timeout: the deadline of unary calls whose context has none. 0 means 30 s; < 0 means none.
	// Streams get no default deadline: give their context one.
	Timeout time.Duration
	// ConnectTimeout: how long a connection attempt may take before calls fail with UNAVAILABLE.
	// 0 means 5 s.
	ConnectTimeout time.Duration
	// Retry: backoff for UNAVAILABLE on idempotent calls. The zero value means DefaultRetry; use NoRetry to turn it off.
	Retry RetryPolicy
	// MaxMessageBytes: largest message sent or received. 0 means 64 MiB.
	MaxMessageBytes int
}

// HOST:PORT, [IPv6]:PORT, or a gRPC target with a scheme (unix:/path, dns:///host:port).
var addressPattern = regexp.MustCompile(`^(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}$|^(?:unix|unix-abstract|dns|ipv4|ipv6):\S+$`)

// ParseAddress strips a grpc://, grpcs://, http:// or https:// scheme and checks HOST:PORT.
// secure is true for grpcs:// and https://.
func ParseAddress(address string) (target string, secure bool, err error) {
	target = strings.TrimSpace(address)
	for _, scheme := range []string{"grpc://", "http://", "grpcs://", "https://"} {
		if strings.HasPrefix(target, scheme) {
			target = strings.TrimRight(strings.TrimPrefix(target, scheme), "/")
			secure = scheme == "grpcs://" || scheme == "https://"
		}
	}
	if !addressPattern.MatchString(target) {
		return "", false, fmt.Errorf("address: expected HOST:PORT (e.g. 127.0.0.1:50051), got %q", address)
	}
	return target, secure, nil
}

// Conn is a connection to one server plus the calling conventions (deadlines, retries, typed errors).
type Conn struct {
	Address string
	TLS     bool
	// CC is the underlying connection: use it for RPCs this package does not wrap; it carries the token.
	CC      *grpc.ClientConn
	timeout time.Duration
	retry   RetryPolicy
}

// Dial opens a connection (lazily: nothing is sent before the first call). Errors here are about
// the options, never about the network: a bad address surfaces on the first call, as UNAVAILABLE.
func Dial(address string, options *Options) (*Conn, error) {
	var o Options
	if options != nil {
		o = *options
	}
	target, secure, err := ParseAddress(address)
	if err != nil {
		return nil, err
	}
	if strings.ContainsAny(o.Token, "\r\n") || (o.Token != "" && strings.TrimSpace(o.Token) == "") {
		return nil, errors.New("token: must be a single non-blank line")
	}
	o.Token = strings.TrimSpace(o.Token)
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = 5 * time.Second
	}
	if o.ConnectTimeout < 0 {
		return nil, fmt.Errorf("ConnectTimeout: must be > 0, got %v", o.ConnectTimeout)
	}
	if o.Retry == (RetryPolicy{}) {
		o.Retry = DefaultRetry
	}
	if o.Retry.Retries < 0 {
		return nil, fmt.Errorf("Retry.Retries: must be >= 0, got %d", o.Retry.Retries)
	}
	if o.MaxMessageBytes == 0 {
		o.MaxMessageBytes = 64 << 20
	}
	roots := o.RootCertificates
	if o.RootCertificatesFile != "" {
		if roots != nil {
			return nil, errors.New("RootCertificates and RootCertificatesFile: give one")
		}
		if roots, err = os.ReadFile(o.RootCertificatesFile); err != nil {
			return nil, fmt.Errorf("RootCertificatesFile: %w", err)
		}
	}
	if (o.ClientCertificate == nil) != (o.ClientKey == nil) {
		return nil, errors.New("ClientCertificate and ClientKey: give both or neither")
	}
	useTLS := o.TLS || secure || roots != nil || o.ClientCertificate != nil

	dialOptions := []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
			MinConnectTimeout: o.ConnectTimeout,
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(o.MaxMessageBytes), grpc.MaxCallSendMsgSize(o.MaxMessageBytes),
			grpc.ForceCodec(protoCodec{})),
		grpc.WithDisableRetry(), // retries are ours (idempotent calls only)
	}
	if useTLS {
		config := &tls.Config{ServerName: o.TLSServerName, MinVersion: tls.VersionTLS12}
		if roots != nil {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(roots) {
				return nil, errors.New("RootCertificates: no PEM certificate found")
			}
			config.RootCAs = pool
		}
		if o.ClientCertificate != nil {
			pair, err := tls.X509KeyPair(o.ClientCertificate, o.ClientKey)
			if err != nil {
				return nil, fmt.Errorf("ClientCertificate/ClientKey: %w", err)
			}
			config.Certificates = []tls.Certificate{pair}
		}
		dialOptions = append(dialOptions, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	} else {
		dialOptions = append(dialOptions, grpc.WithInsecure())
	}
	if o.Token != "" {
		dialOptions = append(dialOptions, grpc.WithPerRPCCredentials(bearer{token: o.Token}))
	}
	cc, err := grpc.Dial(target, dialOptions...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", target, err)
	}
	return &Conn{Address: target, TLS: useTLS, CC: cc, timeout: o.Timeout, retry: o.Retry}, nil
}

// Close closes the connection; calls in flight fail with CANCELLED.
func (c *Conn) Close() error { return c.CC.Close() }

// bearer adds `authorization: Bearer <token>` to every call, over TLS or plaintext alike (plaintext
// only makes sense on loopback, which is where the servers allow it).
type bearer struct{ token string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return false }

// unary runs one unary call with the connection's policy. fn makes the call with the context it
// is given. The deadline (the context's, or the connection's default) bounds the whole call,
// retries included; UNAVAILABLE is retried only when idempotent.
func (c *Conn) unary(ctx context.Context, method string, idempotent bool, fn func(context.Context) error) error {
	_, hasDeadline := ctx.Deadline()
	ownDeadline := false
	if !hasDeadline && c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
		ownDeadline = true
	}
	for retry := 0; ; retry++ {
		err := fn(ctx)
		if err == nil {
			return nil
		}
		_, timed := ctx.Deadline()
		err = wrapError(err, method, c.Address, timed || ownDeadline)
		if !c.shouldRetry(ctx, err, idempotent, retry) {
			return err
		}
	}
}

// shouldRetry waits the backoff and says yes when err is UNAVAILABLE on an idempotent call with
// retries left and time before the deadline.
func (c *Conn) shouldRetry(ctx context.Context, err error, idempotent bool, retry int) bool {
	if !idempotent || CodeOf(err) != codes.Unavailable || retry >= c.retry.Retries {
		return false
	}
	p := c.retry
	base := math.Min(float64(p.MaxBackoff), float64(p.InitialBackoff)*math.Pow(p.Multiplier, float64(retry)))
	wait := time.Duration(base * (1 + p.Jitter*(2*rand.Float64()-1)))
	if deadline, ok := ctx.Deadline(); ok && time.Now().Add(wait).After(deadline) {
		return false // the wait would run past the deadline anyway
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}
