package phaul

import (
	"fmt"
	"time"
)

// Policy decides when pre-copy rounds stop. Its defaults follow QEMU: aim
// for a short downtime, give up after a bounded number of rounds, and stop
// early when rounds no longer help.
type Policy struct {
	// DowntimeTarget is the estimated downtime under which pre-copy stops.
	DowntimeTarget time.Duration
	// MaxRounds bounds the number of pre-copy rounds.
	MaxRounds int
	// FreezeCost is the fixed part of the downtime: freezing, dumping the
	// non-memory state, restoring on the destination.
	FreezeCost time.Duration
	// DumpRate is how fast the frozen part of a migration goes through
	// the whole of memory (bytes/s): the final dump reads every page (the
	// unchanged ones cross the network as references) and the restore
	// writes every page, so this cost scales with the tree's memory, not
	// with what is dirty.
	DumpRate float64
	// MinShrink is the fraction by which the dirty set must shrink from one
	// round to the next for another round to be worth it.
	MinShrink float64
}

// Policy defaults.
const (
	DefaultDowntimeTarget = 300 * time.Millisecond
	DefaultMaxRounds      = 10
)

// DefaultPolicy returns the policy used when a request sets nothing.
func DefaultPolicy() Policy {
	return Policy{
		DowntimeTarget: DefaultDowntimeTarget,
		MaxRounds:      DefaultMaxRounds,
		FreezeCost:     150 * time.Millisecond,
		DumpRate:       400 << 20, // measured: 512 MiB dump + restore ≈ 1.3 s on a 2-core VM
		MinShrink:      0.1,
	}
}

// StopReason says why pre-copy stopped.
type StopReason string

// Reasons pre-copy stops.
const (
	StopConverged    StopReason = "converged"
	StopRoundLimit   StopReason = "round limit"
	StopNotShrinking StopReason = "dirty set not shrinking"
	StopNothingDirty StopReason = "nothing dirty"
)

// Decision is the policy's verdict after a round.
type Decision struct {
	Stop              bool
	Reason            StopReason
	EstimatedDowntime time.Duration
	// Explanation is a sentence for the user.
	Explanation string
}

// Estimate returns the expected downtime if the tree were frozen now with
// dirty bytes still to send at bandwidth bytes/s and memory bytes in all.
func (p Policy) Estimate(dirty uint64, bandwidth float64, memory uint64) time.Duration {
	d := p.FreezeCost
	if bandwidth > 0 {
		d += time.Duration(float64(dirty) / bandwidth * float64(time.Second))
	}
	if p.DumpRate > 0 {
		d += time.Duration(float64(memory) / p.DumpRate * float64(time.Second))
	}
	return d
}

// Decide judges the rounds so far. rounds holds every round's stats in
// order; the first round copies everything and never converges on its own
// unless nothing is dirty afterwards.
func (p Policy) Decide(rounds []RoundStats, memory uint64) Decision {
	n := len(rounds)
	if n == 0 {
		return Decision{}
	}
	last := rounds[n-1]
	bw := bandwidth(rounds)
	// What the final dump will have to send is what dirtied during the
	// last round: estimate it from the dirty rate over that round's time.
	dirty := uint64(last.DirtyRate * last.Duration.Seconds())
	if n > 1 {
		dirty = last.PagesChanged * pageSize
	}
	est := p.Estimate(dirty, bw, memory)
	d := Decision{EstimatedDowntime: est}
	switch {
	case n > 1 && last.PagesChanged == 0:
		d.Stop, d.Reason = true, StopNothingDirty
		d.Explanation = fmt.Sprintf("round %d found no changed pages", n)
	case n > 1 && est <= p.DowntimeTarget:
		d.Stop, d.Reason = true, StopConverged
		d.Explanation = fmt.Sprintf("estimated downtime %s is within the target %s", est.Round(time.Millisecond), p.DowntimeTarget)
	case n >= p.MaxRounds:
		d.Stop, d.Reason = true, StopRoundLimit
		d.Explanation = fmt.Sprintf("reached the limit of %d rounds; estimated downtime %s (target %s)", p.MaxRounds, est.Round(time.Millisecond), p.DowntimeTarget)
	case n > 2 && !shrinking(rounds[n-2].PagesChanged, last.PagesChanged, p.MinShrink):
		d.Stop, d.Reason = true, StopNotShrinking
		d.Explanation = fmt.Sprintf("round %d changed %d pages after %d: the process dirties memory as fast as it is copied; estimated downtime %s", n, last.PagesChanged, rounds[n-2].PagesChanged, est.Round(time.Millisecond))
	case n == 1:
		d.Explanation = fmt.Sprintf("first round copied everything; another round measures the dirty rate (estimated downtime now %s)", est.Round(time.Millisecond))
	default:
		d.Explanation = fmt.Sprintf("estimated downtime %s above the target %s: another round", est.Round(time.Millisecond), p.DowntimeTarget)
	}
	return d
}

const pageSize = 4096

func shrinking(prev, cur uint64, minShrink float64) bool {
	return float64(cur) <= float64(prev)*(1-minShrink)
}

// bandwidth is the measured transfer rate of the rounds that moved enough
// data to time it, in bytes/s of raw memory; 0 when unknown.
func bandwidth(rounds []RoundStats) float64 {
	var bytes uint64
	var dur time.Duration
	for _, r := range rounds {
		if r.BytesRaw < 1<<20 {
			continue
		}
		bytes += r.BytesRaw
		dur += r.Duration
	}
	if dur <= 0 {
		return 0
	}
	return float64(bytes) / dur.Seconds()
}
