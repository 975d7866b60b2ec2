package phaul

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Recovery after an agent restart.
//
// The source is the coordinator, so its journal decides:
//   - a record whose decision is commit (decided-commit) is driven forward:
//     the commit is re-sent until the destination acknowledges it, then the
//     source's frozen copy is removed if it still exists;
//   - every other unfinished record is driven back: abort is written, the
//     source's copy is resumed if it is frozen, and the abort is re-sent
//     until the destination acknowledges it. Resuming before that ack is
//     safe: the destination never resumes a restored copy on its own.
//
// The destination reloads its unfinished records and waits: a restored,
// stopped tree is kept until the source commits or aborts it; anything
// short of a restored tree is discarded (the source can only abort it).

// RecoveryRetry is how often an unacknowledged decision is re-sent.
var RecoveryRetry = 500 * time.Millisecond

// Recover drives every unfinished source-side record of the journal to an
// end, in the background: it returns at once with the records it took up.
// The goroutines it starts end when the peer acknowledges or Close is
// called.
func (s *Source) Recover() []Record {
	recs, errs := s.cfg.Journal.List()
	for _, err := range errs {
		s.log.Error("unreadable journal record", "error", err)
	}
	var todo []Record
	for _, r := range recs {
		if r.Role != "source" || r.Terminal() {
			continue
		}
		todo = append(todo, r)
	}
	for _, r := range todo {
		s.resend(r, "the source agent restarted before the commit point")
	}
	return todo
}

// resend drives r to an end in a goroutine owned by the Source: a commit
// decision is carried out and re-sent, anything else is aborted and the
// abort re-sent, until the destination acknowledges or Close.
func (s *Source) resend(r Record, why string) {
	ctx, cancel := context.WithCancel(context.Background())
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		cancel()
		return
	}
	s.recovering = append(s.recovering, cancel)
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer cancel()
		s.recoverOne(ctx, r, why)
	}()
}

func (s *Source) recoverOne(ctx context.Context, r Record, why string) {
	log := s.log.With("migration_id", r.ID, "pid", r.PID, "destination", r.Peer)
	tree := Tree{PIDs: r.PIDs, Identity: r.Identity}
	if len(tree.PIDs) == 0 {
		tree.PIDs = []int{r.PID}
	}
	commit := r.State == StateDecidedCommit
	if !commit {
		r.State = StateDecidedAbort
		if why != "" {
			r.Error = joinErr(r.Error, why)
		}
		if err := s.putRecovered(r); err != nil {
			log.Error("journal write failed", "error", err)
		}
		// The source copy is ours to resume: at most one copy runs because
		// the destination never resumes on its own.
		if s.cfg.Local.Alive(tree) {
			if err := s.cfg.Local.Resume(tree); err != nil {
				log.Error("resuming the source copy failed", "error", err)
			}
		}
		log.Info("recovery: migration aborted, the process runs on the source")
		s.cfg.Local.Cleanup(r.ID)
	} else {
		log.Info("recovery: commit decided; re-sending it, the frozen source copy stays until the destination acknowledges")
	}

	var peer Peer
	defer func() {
		if peer != nil {
			peer.Close()
		}
	}()
	for attempt := 0; ; attempt++ {
		if ctx.Err() != nil {
			return
		}
		var err error
		if peer == nil {
			peer, err = s.cfg.Dial(ctx, r.Peer)
		}
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if commit {
				var pid int
				pid, err = peer.Commit(cctx, r.ID)
				if err == nil {
					r.State, r.DestPID = StateDone, pid
					r.Error = joinErr(r.Error, "recovered after an agent restart: committed")
				}
				if errors.Is(err, ErrDiscarded) {
					// The destination holds no copy and never will: the
					// frozen one here is the only one left.
					cancel()
					log.Error("recovery: the destination lost its copy before the commit reached it; resuming the source copy", "error", err)
					if s.cfg.Local.Alive(tree) {
						if rerr := s.cfg.Local.Resume(tree); rerr != nil {
							log.Error("resuming the source copy failed", "error", rerr)
						}
					}
					r.State = StateAborted
					r.Error = joinErr(r.Error, "the destination lost its copy before the commit reached it; the source copy resumed")
					if jerr := s.putRecovered(r); jerr != nil {
						log.Error("journal write failed", "error", jerr)
					}
					s.cfg.Local.Cleanup(r.ID)
					return
				}
			} else {
				err = peer.Abort(cctx, r.ID, joinErr(why, "aborted by the source"))
				if err == nil {
					r.State = StateAborted
				}
			}
			cancel()
		}
		if err == nil {
			if commit {
				// The destination runs its copy: the frozen one here goes.
				if s.cfg.Local.Alive(tree) {
					if kerr := s.cfg.Local.Kill(tree); kerr != nil {
						log.Error("removing the frozen source copy failed", "error", kerr)
					}
				}
				s.cfg.Local.Cleanup(r.ID)
			}
			if jerr := s.putRecovered(r); jerr != nil {
				log.Error("journal write failed", "error", jerr)
			}
			log.Info("recovery: destination acknowledged", "state", r.State)
			return
		}
		if attempt%20 == 0 {
			log.Warn("recovery: destination did not acknowledge yet; retrying", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(RecoveryRetry):
		}
	}
}

// putRecovered journals r and shows its state in the migration's
// in-memory view, if this agent still has one, so that `migratectl status`
// tells what the background re-sends achieved.
func (s *Source) putRecovered(r Record) error {
	err := s.cfg.Journal.Put(r)
	if m, ok := s.Get(r.ID); ok {
		m.setState(r.State)
	}
	return err
}

func joinErr(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// Recover reloads the destination's unfinished records: a restored tree
// that still exists (stopped) is kept for the source's decision; anything
// else is discarded. It returns the records it kept and a description of
// orphaned state for the operator.
func (d *Destination) Recover() (kept []Record, notes []string) {
	recs, errs := d.cfg.Journal.List()
	for _, err := range errs {
		notes = append(notes, fmt.Sprintf("unreadable journal record: %v", err))
	}
	for _, r := range recs {
		if r.Role != "destination" || r.State == DestCommitted || r.State == DestAborted {
			continue
		}
		m := &destMigration{rec: r, workDir: "", restored: false}
		tree := RestoredTree{PID: r.DestPID, PIDs: r.PIDs, Identity: r.Identity}
		if (r.State == DestRestored || r.State == DestRestoring) && r.DestPID != 0 && d.cfg.Local.Alive(tree) {
			m.tree, m.restored = tree, true
			m.rec.State = DestRestored
			d.mu.Lock()
			d.migs[r.ID] = m
			d.mu.Unlock()
			kept = append(kept, m.rec)
			notes = append(notes, fmt.Sprintf("migration %s: restored tree (pid %d) kept stopped until the source decides", r.ID, r.DestPID))
			continue
		}
		m.rec.State = DestAborted
		m.rec.Error = joinErr(r.Error, "the destination agent restarted before the restore completed")
		d.mu.Lock()
		d.migs[r.ID] = m
		d.mu.Unlock()
		d.discard(m)
		notes = append(notes, fmt.Sprintf("migration %s: discarded (state %s at restart)", r.ID, r.State))
	}
	return kept, notes
}
