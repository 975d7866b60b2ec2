package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSystemdUnit checks deploy/systemd/migrated.service: the settings the
// agent depends on are there, and systemd-analyze verify accepts it (with
// ExecStart pointing at the built binary, since it is not installed here).
func TestSystemdUnit(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(filepath.Join(root, "deploy", "systemd", "migrated.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "RuntimeDirectory=migrated", "StateDirectory=migrated", "Restart=on-failure",
		"KillMode=process", "ExecStart=/usr/local/bin/migrated --config /etc/migrated/config"} {
		if !strings.Contains(string(unit), "\n"+want+"\n") {
			t.Errorf("unit lacks %q", want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		missing(t, "systemd-analyze not found (package systemd)")
	}
	bin := BuildTool(t, "./cmd/migrated")
	dir := t.TempDir()
	copyUnit := filepath.Join(dir, "migrated.service")
	if err := os.WriteFile(copyUnit, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/migrated", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", copyUnit).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestRestoredProcessSurvivesAgent: a process migrated to a host is not the
// agent's child, nor in its process group or session, so it keeps running
// when the agent is killed (SIGKILL, as systemd's KillMode=process does on a
// crash) or stopped (SIGTERM), and the restarted agent still knows the
// migration as committed.
//
// The source agent serves metrics: after the move they count it.
func TestRestoredProcessSurvivesAgent(t *testing.T) {
	RequireCRIU(t)
	hs := NewHosts(t, 2)
	metricsAddr := net.JoinHostPort(hs[0].IP, "9446")
	b := &migrationBed{A: hs[0], B: hs[1]}
	b.SrcAgent = StartAgent(t, b.A, "--metrics-listen", metricsAddr)
	b.DstAgent = StartAgent(t, b.B)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("source agent log:\n%s", b.SrcAgent.Log())
			t.Logf("destination agent log:\n%s", b.DstAgent.Log())
		}
	})
	p := startMemhog(t, b.A, "--mem", "64")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	r := b.SrcAgent.Move(t, p.PID, b.DstAgent)
	q := assertMoved(t, b, p, r, before)
	checkMetrics(t, b.A, metricsAddr)

	info, err := q.Info()
	if err != nil {
		t.Fatal(err)
	}
	agentInfo, err := b.DstAgent.Proc.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.PPID == agentInfo.PID || info.PGID == agentInfo.PGID || info.SID == agentInfo.SID {
		t.Fatalf("restored process %+v shares parent, group or session with the agent %+v", info, agentInfo)
	}

	alive := func(what string) {
		t.Helper()
		st, err := q.Status()
		if err != nil {
			t.Fatal(err)
		}
		WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Counter > st.Counter+50 }, 30*time.Second)
		if i, err := q.Info(); err != nil || i.State == 'T' || i.State == 'Z' {
			t.Fatalf("after %s the restored process is %+v (%v)", what, i, err)
		}
	}
	b.DstAgent.Kill9(t)
	alive("SIGKILL of the agent")
	b.DstAgent.Start(t)
	alive("the agent's restart")
	out, _, err := b.DstAgent.Ctl(context.Background(), "list")
	if err != nil || !strings.Contains(out, r.Last.MigrationID) || !strings.Contains(out, "committed") {
		t.Fatalf("restarted agent's list: %v\n%s", err, out)
	}
	b.DstAgent.Stop(t)
	alive("SIGTERM of the agent")
	b.DstAgent.Start(t)
	alive("the second restart")
}

// checkMetrics scrapes the source agent's metrics from inside its host
// after one moved migration.
func checkMetrics(t *testing.T, h *Host, addr string) {
	t.Helper()
	dial := dialFrom(h)
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, a string) (net.Conn, error) { return dial(ctx, a) }}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	values := map[string]float64{}
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "migrated_") {
			if i := strings.LastIndexByte(l, ' '); i > 0 {
				v, _ := strconv.ParseFloat(l[i+1:], 64)
				values[l[:i]] = v
			}
		}
	}
	for key, ok := range map[string]func(float64) bool{
		`migrated_migrations_total{result="moved"}`:                        func(v float64) bool { return v == 1 },
		`migrated_migrations_total{result="failed"}`:                       func(v float64) bool { return v == 0 },
		`migrated_migrations_in_flight`:                                    func(v float64) bool { return v == 0 },
		`migrated_migration_downtime_seconds_count`:                        func(v float64) bool { return v == 1 },
		`migrated_migration_downtime_seconds_sum`:                          func(v float64) bool { return v > 0 },
		`migrated_migration_bytes_total{kind="wire"}`:                      func(v float64) bool { return v > 0 },
		`migrated_migration_bytes_total{kind="raw"}`:                       func(v float64) bool { return v >= 64<<20 },
		`migrated_migration_phase_duration_seconds_count{phase="prepare"}`: func(v float64) bool { return v == 1 },
		`migrated_migration_phase_duration_seconds_count{phase="dump"}`:    func(v float64) bool { return v == 1 },
		`migrated_migration_phase_duration_seconds_count{phase="restore"}`: func(v float64) bool { return v == 1 },
		`migrated_migration_precopy_rounds_count`:                          func(v float64) bool { return v == 1 },
	} {
		v, found := values[key]
		if !found || !ok(v) {
			t.Errorf("metric %s = %v (present %v)", key, v, found)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	}
}
