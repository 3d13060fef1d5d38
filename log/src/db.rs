//! A database handle that reports when its file is released.

use redb::Database;

/// A redb database that says when it is closed: redb releases its file lock in `Drop`, which may
/// still be running on another thread after the last `Arc` is gone, so counting handles is not
/// enough to know that another process may open the file.
pub struct ClosingDb {
    db: Option<Database>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ClosingDb {
    pub fn new(db: Database) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Self {
                db: Some(db),
                closed: Some(tx),
            },
            rx,
        )
    }
}

impl std::ops::Deref for ClosingDb {
    type Target = Database;
    fn deref(&self) -> &Database {
        // Only `Drop` takes the database out.
        self.db.as_ref().expect("database is open until dropped")
    }
}

impl Drop for ClosingDb {
    fn drop(&mut self) {
        drop(self.db.take());
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(());
        }
    }
}
