package criurpc

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"testing"
)

// helperEnv, when set, turns the test binary into a helper that runs one
// client operation and prints its outcome as JSON: the two-host tests run
// it inside a host (Host.Command) so that the client and CRIU live in that
// host's namespaces, as the agent does.
const helperEnv = "CRIURPC_TEST_HELPER"

// helperRequest is what the helper should do.
type helperRequest struct {
	// "dump", "restore", "page-server", "lazy-dump" or "lazy-restore"
	Op           string
	ImagesDir    string
	PID          int
	LeaveStopped bool
	// Address and Port: the page server to dump to (dump) or the address
	// to listen on (page-server).
	Address string
	Port    int
}

// helperResult is the helper's answer, one JSON line. Some operations
// answer twice: a page server once started, then after Wait (the test writes
// a line to the helper's stdin to ask for it); a lazy dump when its page
// server is ready, then when all pages were fetched; a lazy restore when the
// tree runs, then when the lazy-pages daemon finished.
type helperResult struct {
	PID           int
	Port          int
	PagesWritten  uint64
	PagesRestored uint64
	// Ready: a lazy dump's page server listens.
	Ready bool
	Err   string
}

func TestMain(m *testing.M) {
	if req := os.Getenv(helperEnv); req != "" {
		os.Exit(runHelper(req))
	}
	if scenario := os.Getenv(fakeCRIUEnv); scenario != "" {
		os.Exit(runFakeCRIU(scenario))
	}
	os.Exit(m.Run())
}

func runHelper(reqJSON string) int {
	var req helperRequest
	enc := json.NewEncoder(os.Stdout)
	if err := json.Unmarshal([]byte(reqJSON), &req); err != nil {
		enc.Encode(helperResult{Err: err.Error()})
		return 1
	}
	res := helperDo(context.Background(), req, enc)
	enc.Encode(res)
	if res.Err != "" {
		return 1
	}
	return 0
}

func helperDo(ctx context.Context, req helperRequest, enc *json.Encoder) helperResult {
	c := New()
	switch req.Op {
	case "dump":
		o := DumpOptions{ImagesDir: req.ImagesDir, PID: req.PID, LeaveStopped: req.LeaveStopped}
		if req.Port != 0 {
			o.PageServer = &PageServerTarget{Address: req.Address, Port: req.Port}
		}
		st, err := c.Dump(ctx, o, nil)
		if err != nil {
			return helperResult{Err: err.Error()}
		}
		if st == nil {
			return helperResult{Err: "dump without stats"}
		}
		return helperResult{PagesWritten: st.PagesWritten}
	case "restore":
		res, err := c.Restore(ctx, RestoreOptions{ImagesDir: req.ImagesDir}, nil)
		if err != nil {
			return helperResult{Err: err.Error()}
		}
		if res.Stats == nil {
			return helperResult{Err: "restore without stats"}
		}
		return helperResult{PID: res.PID, PagesRestored: res.Stats.PagesRestored}
	case "page-server":
		ps, err := c.StartPageServer(ctx, PageServerOptions{ImagesDir: req.ImagesDir, Address: req.Address})
		if err != nil {
			return helperResult{Err: err.Error()}
		}
		enc.Encode(helperResult{PID: ps.PID, Port: ps.Port})
		// Any line, or EOF, on stdin asks for Wait.
		bufio.NewReader(os.Stdin).ReadString('\n')
		if err := ps.Wait(ctx); err != nil {
			return helperResult{Err: err.Error()}
		}
		return helperResult{}
	case "lazy-dump":
		o := DumpOptions{ImagesDir: req.ImagesDir, PID: req.PID, LazyPages: true,
			PageServer: &PageServerTarget{Port: req.Port}}
		ready := &Hooks{StatusReady: func(context.Context) error {
			return enc.Encode(helperResult{Ready: true})
		}}
		st, err := c.Dump(ctx, o, ready)
		if err != nil {
			return helperResult{Err: err.Error()}
		}
		if st == nil {
			return helperResult{Err: "dump without stats"}
		}
		return helperResult{PagesWritten: st.PagesWritten}
	case "lazy-restore":
		lp, err := c.StartLazyPages(ctx, LazyPagesOptions{ImagesDir: req.ImagesDir, Address: req.Address, Port: req.Port})
		if err != nil {
			return helperResult{Err: err.Error()}
		}
		res, err := c.Restore(ctx, RestoreOptions{ImagesDir: req.ImagesDir, LazyPages: true}, nil)
		if err != nil {
			lp.Kill()
			return helperResult{Err: err.Error()}
		}
		enc.Encode(helperResult{PID: res.PID})
		if err := lp.Wait(ctx); err != nil {
			return helperResult{Err: err.Error()}
		}
		return helperResult{}
	}
	return helperResult{Err: fmt.Sprintf("unknown helper op %q", req.Op)}
}
