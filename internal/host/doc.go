// Package host implements the engine's view of the local machine
// (phaul.Local on the source, phaul.DestLocal on the destination) with
// pkg/criurpc and pkg/pagexfer: inspecting process trees in /proc, dumping
// through CRIU with the page stream on a socketpair, running CRIU's page
// server fed by the replayed stream, restoring, and resuming or removing
// frozen trees with signals.
package host
