package e2e

import (
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

//go:embed internal/hostinit/hostinit.c
var hostinitSource []byte

// binPrefix names the per-process directory, under /tmp, that holds the
// binaries BuildTool and the C builds produce.
const binPrefix = "mge2e-bin-"

var binCache struct {
	mu    sync.Mutex
	dir   string
	err   error
	built map[string]*buildResult
}

type buildResult struct {
	once sync.Once
	path string
	err  error
}

// cacheDir returns this test process's binary directory, creating it on first
// use and removing those of test processes that no longer exist.
func cacheDir() (string, error) {
	binCache.mu.Lock()
	defer binCache.mu.Unlock()
	if binCache.dir != "" || binCache.err != nil {
		return binCache.dir, binCache.err
	}
	stale, _ := filepath.Glob(filepath.Join(os.TempDir(), binPrefix+"*"))
	for _, d := range stale {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), binPrefix))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			os.RemoveAll(d)
		}
	}
	d := filepath.Join(os.TempDir(), binPrefix+strconv.Itoa(os.Getpid()))
	if err := os.MkdirAll(d, 0o755); err != nil {
		binCache.err = err
		return "", err
	}
	binCache.dir = d
	return d, nil
}

func cached(key string) *buildResult {
	binCache.mu.Lock()
	defer binCache.mu.Unlock()
	if binCache.built == nil {
		binCache.built = make(map[string]*buildResult)
	}
	r := binCache.built[key]
	if r == nil {
		r = &buildResult{}
		binCache.built[key] = r
	}
	return r
}

// ModuleRoot returns the directory of this module's go.mod.
func ModuleRoot() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok {
		root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err == nil {
			return root, nil
		}
	}
	out, err := exec.Command(goBinary(), "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("locate module root: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("locate module root: not inside a module")
	}
	return filepath.Dir(mod), nil
}

func goBinary() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// BuildTool builds a main package of this module and returns the binary's
// path. pkg is either relative to the module root ("./cmd/migrated") or an
// import path. Each package is built once per test process into a directory
// shared by all tests of that process (/tmp/mge2e-bin-PID; directories of
// finished test processes are removed on the next run); the Go build cache
// keeps rebuilds cheap. A build failure fails the test.
func BuildTool(t testing.TB, pkg string) string {
	t.Helper()
	r := cached("go:" + pkg)
	r.once.Do(func() {
		r.path, r.err = buildGo(pkg)
	})
	if r.err != nil {
		t.Fatalf("BuildTool(%q): %v", pkg, r.err)
	}
	return r.path
}

func buildGo(pkg string) (string, error) {
	dir, err := cacheDir()
	if err != nil {
		return "", err
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	name := filepath.Base(strings.TrimSuffix(pkg, "/"))
	out := filepath.Join(dir, fmt.Sprintf("%s-%x", name, fnv32(pkg)))
	cmd := exec.Command(goBinary(), "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return out, nil
}

// buildC compiles a single-file C program with gcc into the binary cache,
// once per test process, and returns its path. A build failure fails the test.
func buildC(t testing.TB, name string, src []byte) string {
	t.Helper()
	r := cached("c:" + name)
	r.once.Do(func() {
		dir, err := cacheDir()
		if err != nil {
			r.err = err
			return
		}
		out := filepath.Join(dir, name)
		cmd := exec.Command("gcc", "-O2", "-Wall", "-o", out, "-x", "c", "-")
		cmd.Stdin = bytes.NewReader(src)
		if b, err := cmd.CombinedOutput(); err != nil {
			r.err = fmt.Errorf("gcc %s: %v\n%s", name, err, b)
			return
		}
		r.path = out
	})
	if r.err != nil {
		t.Fatalf("build %s: %v", name, r.err)
	}
	return r.path
}

func fnv32(s string) uint32 {
	h := uint32(2166136261)
	for i := 0; i < len(s); i++ {
		h ^= uint32(s[i])
		h *= 16777619
	}
	return h
}

// RemoveBinaries deletes this process's binary directory: the e2e suite's
// TestMain, the demo and the benchmark call it when they end. A process
// that never calls it (one that was killed) leaves its directory to the next
// one (cacheDir).
func RemoveBinaries() {
	binCache.mu.Lock()
	defer binCache.mu.Unlock()
	if binCache.dir != "" {
		os.RemoveAll(binCache.dir)
		binCache.dir = ""
		binCache.built = nil
	}
}
