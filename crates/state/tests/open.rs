//! Opening the state store through `open_state`: choosing the backend by URL or path, creating
//! the SQLite folder, keeping data across reopen, and never leaking a password in an error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error;

use sluice_core::names::{EnvironmentName, PlanId};
use sluice_state::{PostgresState, StateError, open_state};

const SECRET_URL: &str = "postgres://sluice:s3cr3tpw@127.0.0.1:1/x";

/// Display, Debug and every source of the error.
fn everything_printed(error: &StateError) -> String {
    let mut text = format!("{error}\n{error:?}");
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n{cause}\n{cause:?}"));
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn a_bad_postgres_url_never_shows_its_password() {
    let error = PostgresState::connect(SECRET_URL).await.unwrap_err();
    let printed = everything_printed(&error);
    assert!(!printed.contains("s3cr3tpw"), "{printed}");
    assert!(printed.contains("127.0.0.1:1"), "the message names the server: {printed}");
    assert!(error.is_transient(), "a refused connection is worth a retry: {printed}");

    let error = open_state(SECRET_URL).await.err().unwrap();
    let printed = everything_printed(&error);
    assert!(!printed.contains("s3cr3tpw"), "{printed}");

    let error = open_state("postgresql://sluice:s3cr3tpw@127.0.0.1:notaport/x").await.err().unwrap();
    let printed = everything_printed(&error);
    assert!(!printed.contains("s3cr3tpw"), "{printed}");
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_rejected_login_never_shows_its_password() {
    // The server is up, but the role does not exist: a persistent failure.
    let error =
        PostgresState::connect("postgres://no_such_sluice_role:s3cr3tpw@127.0.0.1:5432/postgres").await.unwrap_err();
    let printed = everything_printed(&error);
    assert!(!printed.contains("s3cr3tpw"), "{printed}");
    assert!(!error.is_transient(), "{printed}");
}

#[tokio::test]
async fn sqlite_paths_create_their_folder_and_keep_state() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("project/.sluice/state.db");
    let plan = PlanId("p1".to_string());
    {
        let store = open_state(path.to_str().unwrap()).await.unwrap();
        store.trip_breaker(&plan, "kept across reopen").await.unwrap();
    }
    assert!(path.exists());
    let url = format!("sqlite://{}", path.display());
    let store = open_state(&url).await.unwrap();
    assert_eq!(store.breaker(&plan).await.unwrap().as_deref(), Some("kept across reopen"));
    assert_eq!(store.get_environment(&EnvironmentName::prod()).await.unwrap(), None);
    assert!(matches!(open_state("").await, Err(StateError::Invalid { .. })));
}
