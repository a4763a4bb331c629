//! PostgreSQL for tests: `./scripts/test` starts a throwaway server (Debian's `postgresql`:
//! initdb into a temporary directory, `pg_ctl` on a free loopback port) and passes its admin
//! URL in `BERTH_TEST_POSTGRES_URL`; every test makes databases of its own there, so tests run
//! side by side.

use berth::config::{Config, MetadataSection, PostgresSection};

/// The admin URL of the test server (database `postgres`).
pub(crate) fn admin_url() -> String {
    std::env::var("BERTH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "BERTH_TEST_POSTGRES_URL is not set: ./scripts/test starts a PostgreSQL server and sets it"
        )
    })
}

/// Creates an empty database and returns its URL. It sorts text as most production databases
/// do (ICU `en-US`, where `_x` comes before `B`), so that a listing relying on the database's
/// default order instead of byte order fails here.
pub(crate) async fn fresh_database(what: &str) -> String {
    let admin = admin_url();
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
    tokio::spawn(conn);
    let name = format!(
        "{what}_{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..12)
            .unwrap_or("x")
    );
    client
        .batch_execute(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' \
             LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.utf8'"
        ))
        .await
        .expect("create database");
    let (base, _) = admin
        .rsplit_once('/')
        .expect("admin url ends in /<database>");
    format!("{base}/{name}")
}

/// Points `c`'s metadata at `url`.
pub(crate) fn use_postgres(c: &mut Config, url: &str) {
    c.metadata = MetadataSection::Postgres(PostgresSection {
        url: Some(url.to_owned()),
        ..PostgresSection::default()
    });
}
