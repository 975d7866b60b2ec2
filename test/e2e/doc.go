// Package e2e is migrated's two-host test bed: simulated hosts built from
// Linux namespaces on one machine, and the end-to-end tests that run real
// CRIU, real processes and real agents in them.
package e2e
