//! PostgreSQL servers for the tests of a PostgreSQL store: a `postgres` process of the test's
//! own on a free port, in a throwaway data directory, started under
//! [`Supervised`](crate::process::Supervised) as [`RedisServer`](crate::redis::RedisServer) is,
//! so that a server shared by a whole test binary does not outlive it.
//!
//! Nothing lives here yet: the helper comes with the store that needs it.
