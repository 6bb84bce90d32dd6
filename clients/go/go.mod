// Module users: generate the stubs first (`make clients-go` in the repository, or
// `bash generate.sh`), then `go mod tidy` fills go.sum. The repository itself builds and tests
// this package in GOPATH mode against Debian's packages (README.md says why).
module tokenfeedback.dev/clients/go

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
