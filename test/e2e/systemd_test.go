package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
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
func TestRestoredProcessSurvivesAgent(t *testing.T) {
	b := newMigrationBed(t)
	p := startMemhog(t, b.A, "--mem", "64")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	r := b.SrcAgent.Move(t, p.PID, b.DstAgent)
	q := assertMoved(t, b, p, r, before)

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
