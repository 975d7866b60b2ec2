package certs

import "errors"

// ErrInvalid reports a host specification or a file that cannot be used.
var ErrInvalid = errors.New("invalid certificate request")
