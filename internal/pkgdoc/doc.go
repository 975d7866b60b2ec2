// Package pkgdoc holds a test that every package in the module has a
// package doc comment. It has no code of its own.
package pkgdoc
