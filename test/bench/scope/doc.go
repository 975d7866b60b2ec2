// Package scope provides T, a testing.TB for programs (the migration
// benchmark, the demo) that drive the test bed of test/e2e outside `go test`.
// A T collects cleanups and runs them, last first, when its scope ends;
// Fatal, FailNow and Skip end the scope early, through a panic that Run
// recovers, the way they end a test. Outside a test nothing may be skipped
// silently: a skip (a missing prerequisite such as root or CRIU) fails the
// scope with its reason.
package scope
