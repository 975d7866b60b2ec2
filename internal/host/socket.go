package host

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// pageSocketBuffer is the send and receive buffer of a page stream's
// socketpair. The default (about 200 KiB) makes CRIU and the agent take
// turns every few dozen pages; a few MiB let a whole batch through at once.
// The kernel caps it at net.core.wmem_max and rmem_max.
const pageSocketBuffer = 4 << 20

// pageSocket returns a connected pair for a CRIU page stream: the end CRIU
// is handed (as ps.fd or a page server's socket) and the agent's end.
func pageSocket() (criuEnd *os.File, ours net.Conn, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	for _, fd := range fds {
		// Best effort: a smaller buffer is slower, not wrong.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, pageSocketBuffer)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, pageSocketBuffer)
	}
	criuEnd = os.NewFile(uintptr(fds[0]), "criu-ps")
	ourFile := os.NewFile(uintptr(fds[1]), "ps")
	ours, err = net.FileConn(ourFile)
	ourFile.Close()
	if err != nil {
		criuEnd.Close()
		return nil, nil, err
	}
	return criuEnd, ours, nil
}
