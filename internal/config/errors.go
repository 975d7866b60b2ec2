package config

import (
	"errors"
	"fmt"
)

// ErrInvalid reports a setting that cannot be used.
var ErrInvalid = errors.New("invalid configuration")

// KeyError is a problem with one setting; Key is its name in the file,
// Flag its command-line flag.
type KeyError struct {
	Key, Flag string
	Msg       string
}

func (e *KeyError) Error() string {
	if e.Flag == "" {
		return fmt.Sprintf("config key %s: %s", e.Key, e.Msg)
	}
	return fmt.Sprintf("config key %s (--%s): %s", e.Key, e.Flag, e.Msg)
}

func (e *KeyError) Unwrap() error { return ErrInvalid }
