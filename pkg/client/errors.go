package client

import "errors"

// ErrTLSConfig reports an unusable TLS configuration for remote control;
// the message names the file or setting.
var ErrTLSConfig = errors.New("TLS configuration")
