// Package pagexfer moves process memory between hosts: it speaks CRIU's
// page-server protocol on each host and carries pages between the agents
// with deduplication, compression and content-hash pre-copy.
package pagexfer
