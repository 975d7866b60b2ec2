package client_test

import (
	"context"
	"fmt"
	"log"

	"github.com/migrated/migrated/pkg/client"
)

// An orchestrator lists the migrations of the agent on host2, whose
// configuration has control.listen = ":7447" and the orchestrator's
// certificate identity in control.allow.
func ExampleDialTLS() {
	cfg, err := client.LoadTLS(client.TLSFiles{
		Cert: "/etc/orch/tls/orch.crt",
		Key:  "/etc/orch/tls/orch.key",
		CA:   "/etc/orch/tls/ca.crt",
	})
	if err != nil {
		log.Fatal(err)
	}
	c, err := client.DialTLS("host2:7447", cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	list, err := c.List(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	for _, m := range list.Migrations {
		fmt.Println(m.MigrationId, m.State)
	}
}
