package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/migrated/migrated/test/bench/scope"
	"github.com/migrated/migrated/test/e2e"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// config is what the command line selects.
type config struct {
	Quick   bool
	Runs    int
	Out     string
	Only    *regexp.Regexp
	Verbose bool
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	quick := fs.Bool("quick", false, "run the quick subset (under 5 minutes)")
	runs := fs.Int("runs", 0, "runs per method and case (default 3, 1 with --quick)")
	out := fs.String("out", "", "results directory (default test/bench/results, test/bench/results/quick with --quick)")
	only := fs.String("only", "", "run only the cases whose name (link/workload) matches this regular expression")
	verbose := fs.Bool("v", false, "print migrated's events and the test bed's log")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg := config{Quick: *quick, Runs: *runs, Out: *out, Verbose: *verbose}
	if cfg.Runs == 0 {
		cfg.Runs = 3
		if cfg.Quick {
			cfg.Runs = 1
		}
	}
	if *only != "" {
		re, err := regexp.Compile(*only)
		if err != nil {
			return fmt.Errorf("--only: %w", err)
		}
		cfg.Only = re
	}
	if cfg.Out == "" {
		root, err := e2e.ModuleRoot()
		if err != nil {
			return err
		}
		cfg.Out = filepath.Join(root, "test", "bench", "results")
		if cfg.Quick {
			cfg.Out = filepath.Join(cfg.Out, "quick")
		}
	}
	cases := fullPlan()
	if cfg.Quick {
		cases = quickPlan()
	}
	if cfg.Only != nil {
		var sel []benchCase
		for _, c := range cases {
			if cfg.Only.MatchString(c.String()) {
				sel = append(sel, c)
			}
		}
		cases = sel
	}
	if len(cases) == 0 {
		return errors.New("no case selected")
	}
	logw := io.Discard
	if cfg.Verbose {
		logw = stderr
	}
	if err := scope.WaitForBed(ctx, stdout); err != nil {
		return err
	}
	defer e2e.RemoveBinaries()
	root := scope.New(ctx, "bench", logw)
	var results []result
	var failures []error
	start := time.Now()
	err := root.Run("bed", func(t testing.TB) {
		b := newBed(t, stdout, cfg.Verbose)
		for i, c := range cases {
			if ctx.Err() != nil {
				failures = append(failures, ctx.Err())
				return
			}
			fmt.Fprintf(stdout, "[%d/%d %s] %s: %v\n", i+1, len(cases), time.Since(start).Round(time.Second), c, c.Methods)
			err := t.(*scope.T).Run(c.String(), func(t testing.TB) {
				b.runCase(t, c, cfg.Runs, func(r result) {
					results = append(results, r)
					if err := writeRuns(cfg.Out, results); err != nil {
						t.Errorf("write results: %v", err)
					}
				})
			})
			if err != nil {
				fmt.Fprintf(stdout, "  FAILED: %v\n", err)
				failures = append(failures, err)
			}
		}
	})
	if err != nil {
		failures = append(failures, err)
	}
	if len(results) > 0 {
		if err := writeReport(cfg, results, time.Since(start)); err != nil {
			failures = append(failures, err)
		}
		fmt.Fprintf(stdout, "results in %s (%v)\n", cfg.Out, time.Since(start).Round(time.Second))
	}
	return errors.Join(failures...)
}

// fullPlan is `make bench-migrate`: memory sizes on both links; hot sets,
// compressible memory and redis at 1 Gbit/s, where pre-copy and compression
// matter (redis on both links). It runs in about 20 minutes here.
func fullPlan() []benchCase {
	all := []string{methodFloor, methodCold, methodPageServer, methodStopcopy, methodPrecopy}
	linked := all[1:] // the floor does not use the link: unshaped only
	var cs []benchCase
	for _, link := range []string{linkUnshaped, link1Gbit} {
		ms := all
		if link != linkUnshaped {
			ms = linked
		}
		for _, mem := range []int{256, 1024, 2048} {
			cs = append(cs, benchCase{link, workload{Kind: "memhog", MemMiB: mem, HotMiB: 16}, ms})
		}
		cs = append(cs, benchCase{link, workload{Kind: "redis", Keys: 1000000}, ms})
	}
	for _, hot := range []int{0, 128} {
		cs = append(cs, benchCase{link1Gbit, workload{Kind: "memhog", MemMiB: 1024, HotMiB: hot}, linked})
	}
	cs = append(cs, benchCase{link1Gbit, workload{Kind: "memhog", MemMiB: 1024, HotMiB: 16, Compressible: true},
		[]string{methodCold, methodStopcopy, methodPrecopy, methodPrecopyZstd}})
	return cs
}

// quickPlan is `make bench-migrate-quick`: 256 MiB and 1 GiB with a 16 MiB
// hot set on both links, one run each.
func quickPlan() []benchCase {
	var cs []benchCase
	for _, link := range []string{linkUnshaped, link1Gbit} {
		ms := []string{methodFloor, methodCold, methodPageServer, methodStopcopy, methodPrecopy}
		if link != linkUnshaped {
			ms = ms[1:]
		}
		for _, mem := range []int{256, 1024} {
			cs = append(cs, benchCase{link, workload{Kind: "memhog", MemMiB: mem, HotMiB: 16}, ms})
		}
	}
	return cs
}

// smokeCase is the quick subset's smallest case, run by TestBenchSmoke.
func smokeCase() benchCase { return quickPlan()[0] }
