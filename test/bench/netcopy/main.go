// Command netcopy copies the files of a directory to another host over one
// TCP connection, as a tar stream: the image copy of the benchmark's CRIU
// methods, standing in for scp or rsync (the test hosts have neither an ssh
// server nor netcat).
//
//	netcopy recv ADDR DIR   listen on ADDR, accept one connection, extract into DIR
//	netcopy send ADDR DIR   send the regular files of DIR (not recursive) to ADDR
//
// recv prints "listening" on stdout once it accepts connections.
package main

import (
	"archive/tar"
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "netcopy:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout io.Writer) error {
	if len(args) != 3 {
		return errors.New("usage: netcopy recv|send ADDR DIR")
	}
	switch args[0] {
	case "recv":
		return recv(args[1], args[2], stdout)
	case "send":
		return send(args[1], args[2])
	}
	return fmt.Errorf("unknown command %q", args[0])
}

func recv(addr, dir string, stdout io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Fprintln(stdout, "listening")
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tr := tar.NewReader(bufio.NewReaderSize(c, 1<<20))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read stream: %w", err)
		}
		name := filepath.Base(h.Name)
		if name != h.Name || name == "." || name == ".." || h.Typeflag != tar.TypeReg {
			return fmt.Errorf("unexpected entry %q", h.Name)
		}
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, os.FileMode(h.Mode)&0o777)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
}

func send(addr, dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	bw := bufio.NewWriterSize(c, 1<<20)
	tw := tar.NewWriter(bw)
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		if err := sendFile(tw, filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	// Wait for the receiver to close: it has written every file by then.
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	_, err = io.Copy(io.Discard, c)
	return err
}

func sendFile(tw *tar.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	h, err := tar.FileInfoHeader(st, "")
	if err != nil {
		return err
	}
	h.Name = filepath.Base(path)
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}
