package client

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
)

// DefaultSocket is where the agent serves its Control API.
const DefaultSocket = "/run/migrated/migrated.sock"

// Client talks to one agent.
type Client struct {
	conn *grpc.ClientConn
	c    migratev1.ControlClient
}

// Dial connects to the agent's control socket on this host. The connection
// is made on the first call.
func Dial(socket string) (*Client, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", socket, err)
	}
	return &Client{conn: conn, c: migratev1.NewControlClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Raw returns the generated client for calls this package does not wrap.
func (c *Client) Raw() migratev1.ControlClient { return c.c }

// Move starts a migration and returns its event stream; the last event
// carries the outcome.
func (c *Client) Move(ctx context.Context, r *migratev1.MoveRequest) (migratev1.Control_MoveClient, error) {
	return c.c.Move(ctx, r)
}

// MoveAndWait migrates and returns the final event.
func (c *Client) MoveAndWait(ctx context.Context, r *migratev1.MoveRequest, progress func(*migratev1.MoveEvent)) (*migratev1.MoveEvent, error) {
	s, err := c.c.Move(ctx, r)
	if err != nil {
		return nil, err
	}
	var last *migratev1.MoveEvent
	for {
		ev, err := s.Recv()
		if err != nil {
			if last != nil && last.Outcome != nil {
				return last, nil
			}
			return last, err
		}
		last = ev
		if progress != nil {
			progress(ev)
		}
	}
}

// Watch follows a running migration from its first event.
func (c *Client) Watch(ctx context.Context, id string) (migratev1.Control_WatchMigrationClient, error) {
	return c.c.WatchMigration(ctx, &migratev1.GetMigrationRequest{MigrationId: id})
}

// Check runs the preflight of a move.
func (c *Client) Check(ctx context.Context, r *migratev1.CheckRequest) (*migratev1.CheckResponse, error) {
	return c.c.Check(ctx, r)
}

// List lists the migrations the agent knows.
func (c *Client) List(ctx context.Context) (*migratev1.ListMigrationsResponse, error) {
	return c.c.ListMigrations(ctx, &migratev1.ListMigrationsRequest{})
}

// Get reports one migration.
func (c *Client) Get(ctx context.Context, id string) (*migratev1.Migration, error) {
	return c.c.GetMigration(ctx, &migratev1.GetMigrationRequest{MigrationId: id})
}

// Cancel stops a migration before its commit point.
func (c *Client) Cancel(ctx context.Context, id string) (*migratev1.CancelMigrationResponse, error) {
	return c.c.CancelMigration(ctx, &migratev1.CancelMigrationRequest{MigrationId: id})
}

// Version reports the agent's version and capabilities.
func (c *Client) Version(ctx context.Context) (*migratev1.VersionResponse, error) {
	return c.c.Version(ctx, &migratev1.VersionRequest{})
}
