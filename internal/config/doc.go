// Package config is migrated's configuration: the settings, their defaults,
// the configuration file (/etc/migrated/config, TOML), the command-line
// flags that override it, and validation that names the offending key.
//
// Precedence, lowest first: built-in defaults, the file, the flags given on
// the command line. The file is TOML because it is a well-kept, widely known
// format with comments, typed values and sections, and because its decoder
// reports the keys it did not understand, so a misspelt key is an error
// instead of a silently ignored setting. Every key has a flag of the same
// name with dashes (tls.cert is --tls-cert, limits.max_concurrent is
// --max-concurrent; see Keys).
//
// Sizes are integers (bytes) or strings with a binary suffix: "16MiB",
// "1GiB", "512K".
package config
