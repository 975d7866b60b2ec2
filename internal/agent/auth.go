package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
)

// PeerCred is the identity of a process that connected to the control
// socket, as the kernel recorded it at connect time (SO_PEERCRED and
// SO_PEERGROUPS). It is the AuthInfo of calls on the control socket.
type PeerCred struct {
	credentials.CommonAuthInfo
	PID, UID, GID int
	// Groups are the caller's supplementary groups.
	Groups []int
}

// AuthType implements credentials.AuthInfo.
func (PeerCred) AuthType() string { return "peercred" }

func (c PeerCred) inGroup(gid int) bool {
	if c.GID == gid {
		return true
	}
	for _, g := range c.Groups {
		if g == gid {
			return true
		}
	}
	return false
}

// UnixCredentials returns the control socket's server transport
// credentials: no encryption (the socket is local), but every connection
// carries its caller's PeerCred, read from the kernel when it is accepted.
// A connection whose credentials cannot be read is refused.
func UnixCredentials() credentials.TransportCredentials { return unixCreds{} }

type unixCreds struct{}

func (unixCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, PeerCred{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (unixCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("%w: control connection is a %T, not a unix socket", ErrPermission, conn)
	}
	cred, err := readPeerCred(uc)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: reading the caller's credentials: %v", ErrPermission, err)
	}
	return conn, cred, nil
}

func (unixCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (unixCreds) Clone() credentials.TransportCredentials { return unixCreds{} }
func (unixCreds) OverrideServerName(string) error         { return nil }

// soPeerGroups is SO_PEERGROUPS (Linux 4.13), not named by x/sys/unix.
const soPeerGroups = 59

func readPeerCred(c *net.UnixConn) (PeerCred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return PeerCred{}, err
	}
	var uc *unix.Ucred
	var groups []int
	var gerr error
	cerr := rc.Control(func(fd uintptr) {
		uc, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			return
		}
		groups, gerr = peerGroups(int(fd))
	})
	if cerr != nil {
		return PeerCred{}, cerr
	}
	if err != nil {
		return PeerCred{}, err
	}
	if gerr != nil {
		return PeerCred{}, fmt.Errorf("SO_PEERGROUPS: %w", gerr)
	}
	return PeerCred{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		PID:            int(uc.Pid), UID: int(uc.Uid), GID: int(uc.Gid), Groups: groups,
	}, nil
}

// peerGroups reads SO_PEERGROUPS; the kernel answers ERANGE with the size
// it needs when the buffer is too small.
func peerGroups(fd int) ([]int, error) {
	buf := make([]uint32, 64)
	for {
		n := uint32(len(buf) * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, soPeerGroups,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if e == unix.ERANGE && int(n/4) > len(buf) && n <= 65536*4 {
			buf = make([]uint32, n/4)
			continue
		}
		if e != 0 {
			return nil, e
		}
		out := make([]int, 0, n/4)
		for _, g := range buf[:n/4] {
			out = append(out, int(g))
		}
		return out, nil
	}
}

// Access is what a control call needs.
type Access int

const (
	// AccessRead: calls that only look (list, status, watch, version,
	// check).
	AccessRead Access = iota + 1
	// AccessMove: calls that move or cancel.
	AccessMove
	// AccessAdmin: anything not classified; only root.
	AccessAdmin
)

func (a Access) String() string {
	switch a {
	case AccessRead:
		return "read"
	case AccessMove:
		return "move"
	}
	return "admin"
}

// controlAccess classifies the Control API's methods; an unknown method
// needs AccessAdmin.
var controlAccess = map[string]Access{
	migratev1.Control_ListMigrations_FullMethodName:  AccessRead,
	migratev1.Control_GetMigration_FullMethodName:    AccessRead,
	migratev1.Control_WatchMigration_FullMethodName:  AccessRead,
	migratev1.Control_Version_FullMethodName:         AccessRead,
	migratev1.Control_Check_FullMethodName:           AccessRead,
	migratev1.Control_Move_FullMethodName:            AccessMove,
	migratev1.Control_CancelMigration_FullMethodName: AccessMove,
}

// MethodAccess returns what a full gRPC method name needs.
func MethodAccess(method string) Access {
	if a, ok := controlAccess[method]; ok {
		return a
	}
	return AccessAdmin
}

// ControlAuth authorizes Control API calls. On the unix socket, root (and
// the agent's own user) may call everything; members of Group (primary or
// supplementary) may read, and move or cancel when GroupMayMove; everyone
// else is refused. Over TCP (remote control), the caller must present a
// client certificate verified by the TLS layer and naming an identity on
// RemoteAllow; such callers may call everything. Refusals are logged with
// the caller's identity and returned as PermissionDenied.
type ControlAuth struct {
	// Group is the gid whose members may read; -1 for none.
	Group int
	// GroupName names Group in messages.
	GroupName    string
	GroupMayMove bool
	// RemoteAllow lists the certificate identities (DNS or IP SANs) that
	// may control this agent over TCP.
	RemoteAllow []string
	Log         hclog.Logger
	// Denied, when set, is called for every refused call (metrics).
	Denied func(method string)
}

// Authorize decides a call of method by the caller described by ai.
func (a *ControlAuth) Authorize(method string, ai credentials.AuthInfo) error {
	need := MethodAccess(method)
	switch c := ai.(type) {
	case PeerCred:
		if c.UID == 0 || c.UID == os.Geteuid() {
			return nil
		}
		if a.Group < 0 || !c.inGroup(a.Group) {
			return fmt.Errorf("%w: uid %d is neither root nor a member of the control group%s", ErrPermission, c.UID, a.groupDesc())
		}
		if need == AccessRead || need == AccessMove && a.GroupMayMove {
			return nil
		}
		return fmt.Errorf("%w: members of the control group%s may only read (list, status, watch, version, check); %s needs root%s",
			ErrPermission, a.groupDesc(), shortMethod(method), a.moveHint(need))
	case credentials.TLSInfo:
		if len(c.State.VerifiedChains) == 0 || len(c.State.PeerCertificates) == 0 {
			return fmt.Errorf("%w: remote control needs a verified client certificate", ErrPermission)
		}
		if !Allowed(c.State.PeerCertificates[0], a.RemoteAllow) {
			return fmt.Errorf("%w: certificate %q (%s) may not control this agent (not on the control allow-list)",
				ErrPermission, c.State.PeerCertificates[0].Subject.CommonName, strings.Join(SANs(c.State.PeerCertificates[0]), ", "))
		}
		return nil
	}
	return fmt.Errorf("%w: caller without credentials", ErrPermission)
}

func (a *ControlAuth) groupDesc() string {
	if a.Group < 0 {
		return " (none configured)"
	}
	if a.GroupName != "" {
		return fmt.Sprintf(" %s (gid %d)", a.GroupName, a.Group)
	}
	return fmt.Sprintf(" (gid %d)", a.Group)
}

func (a *ControlAuth) moveHint(need Access) string {
	if need == AccessMove {
		return " (or group_may_move = true in the agent's configuration)"
	}
	return ""
}

func shortMethod(m string) string {
	if i := strings.LastIndexByte(m, '/'); i >= 0 {
		return m[i+1:]
	}
	return m
}

func (a *ControlAuth) check(ctx context.Context, method string) error {
	p, _ := peer.FromContext(ctx)
	var ai credentials.AuthInfo
	if p != nil {
		ai = p.AuthInfo
	}
	err := a.Authorize(method, ai)
	if err != nil {
		log := a.Log
		if log == nil {
			log = hclog.NewNullLogger()
		}
		args := []any{"method", method, "error", err}
		switch c := ai.(type) {
		case PeerCred:
			args = append(args, "uid", c.UID, "gid", c.GID, "pid", c.PID)
		case credentials.TLSInfo:
			args = append(args, "remote", p.Addr.String())
		}
		log.Warn("control call refused", args...)
		if a.Denied != nil {
			a.Denied(method)
		}
	}
	return toStatus(err)
}

// Unary is the interceptor for unary calls.
func (a *ControlAuth) Unary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if err := a.check(ctx, info.FullMethod); err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
}

// Stream is the interceptor for streaming calls.
func (a *ControlAuth) Stream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if err := a.check(ss.Context(), info.FullMethod); err != nil {
			return err
		}
		return h(srv, ss)
	}
}
