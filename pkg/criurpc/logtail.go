package criurpc

import (
	"bytes"
	"io"
	"os"
	"regexp"
	"strings"
)

// maxLogRead bounds how much of the end of a CRIU log is read for an error
// report.
const maxLogRead = 1 << 20

// logTailLines is how many lines an Error's LogTail keeps.
const logTailLines = 12

var (
	// "(00.123456) " timestamp prefix of every CRIU log line.
	logTimeRE = regexp.MustCompile(`^\(\s*\d+\.\d+\)\s*`)
	// "  4242: " PID prefix of lines written by restored tasks.
	logPIDRE = regexp.MustCompile(`^\d+:\s+`)
	// "Error (criu/sk-inet.c:199): " level and source location.
	logLevelRE = regexp.MustCompile(`^(Error|Warn)\s*\([^)]*\):\s*`)
)

// harmlessLogLine reports lines CRIU logs as errors on every run on hosts
// where root lacks CAP_SYS_RESOURCE, which explain nothing.
func harmlessLogLine(line string) bool {
	return strings.Contains(line, "Can't setup RLIMIT_NOFILE for self")
}

// stripLogPrefix removes the timestamp and PID prefixes of a CRIU log line.
func stripLogPrefix(line string) string {
	line = logTimeRE.ReplaceAllString(strings.TrimSpace(line), "")
	return logPIDRE.ReplaceAllString(line, "")
}

// cleanErrMsg turns a CRIU error line into the message alone:
// "(00.1) Error (criu/x.c:1): inet: Connected TCP socket…" becomes
// "inet: Connected TCP socket…".
func cleanErrMsg(s string) string {
	s = stripLogPrefix(strings.TrimSpace(s))
	return strings.TrimSpace(logLevelRE.ReplaceAllString(s, ""))
}

func isErrorLine(line string) bool { return strings.HasPrefix(line, "Error (") }

// logSummary is what an error report takes from a CRIU log.
type logSummary struct {
	firstErr string   // message of the first error line, cleaned
	tail     []string // last meaningful lines, prefixes stripped
}

// summarizeLog extracts the first error and the last meaningful lines from
// the text of a CRIU log. Meaningful lines are error and warning lines; when
// there are none, the last lines of the log.
func summarizeLog(data []byte) logSummary {
	var s logSummary
	var errs, all []string
	for _, raw := range bytes.Split(data, []byte{'\n'}) {
		line := stripLogPrefix(string(raw))
		if line == "" || harmlessLogLine(line) {
			continue
		}
		all = append(all, line)
		if isErrorLine(line) || strings.HasPrefix(line, "Warn ") {
			errs = append(errs, line)
		}
		if s.firstErr == "" && isErrorLine(line) {
			s.firstErr = cleanErrMsg(line)
		}
	}
	pick := errs
	if len(pick) == 0 {
		pick = all
	}
	if len(pick) > logTailLines {
		pick = pick[len(pick)-logTailLines:]
	}
	s.tail = pick
	return s
}

// readLogSummary reads the end of the CRIU log at path. A missing or
// unreadable log gives an empty summary.
func readLogSummary(path string) logSummary {
	if path == "" {
		return logSummary{}
	}
	f, err := os.Open(path)
	if err != nil {
		return logSummary{}
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > maxLogRead {
		if _, err := f.Seek(fi.Size()-maxLogRead, io.SeekStart); err != nil {
			return logSummary{}
		}
	}
	data, err := io.ReadAll(io.LimitReader(f, maxLogRead))
	if err != nil {
		return logSummary{}
	}
	return summarizeLog(data)
}
