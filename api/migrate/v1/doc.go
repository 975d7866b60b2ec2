// Package migratev1 is migrated's wire contract: the Control service
// (migratectl and orchestrators to an agent) and the Peer service (agent to
// agent), generated from migrate.proto. The .proto comments are the API
// documentation.
package migratev1
