//! Errors of project loading: each names a file, a line and a column, and what was expected.

use std::fmt;

/// Where in the project a problem sits. Line and column start at 1; 0 means unknown.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceLocation {
    pub file: String,
    pub line: u64,
    pub column: u64,
}

impl SourceLocation {
    pub fn new(file: impl Into<String>, line: u64, column: u64) -> Self {
        Self { file: file.into(), line, column }
    }

    /// A location that names only the file.
    pub fn file(file: impl Into<String>) -> Self {
        Self::new(file, 0, 0)
    }
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}", self.file),
            (line, 0) => write!(f, "{}:{line}", self.file),
            (line, column) => write!(f, "{}:{line}:{column}", self.file),
        }
    }
}

/// One problem found while reading a project.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ProjectError {
    pub location: SourceLocation,
    pub message: String,
    /// The text is valid SQLMesh that sluice cannot run (Python, Jinja, a kind or macro not
    /// built): its model can be left out of a plan (`--skip-unsupported`), where any other
    /// error stops the whole project.
    pub unsupported: bool,
}

impl ProjectError {
    pub fn new(location: SourceLocation, message: impl Into<String>) -> Self {
        Self { location, message: message.into(), unsupported: false }
    }

    /// SQLMesh that sluice cannot run (see `unsupported`).
    pub fn unsupported(location: SourceLocation, message: impl Into<String>) -> Self {
        Self { location, message: message.into(), unsupported: true }
    }
}

/// Every problem of a project, reported together, sorted by file and position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ProjectErrors(pub Vec<ProjectError>);

impl fmt::Display for ProjectErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        writeln!(f, "the project has {count} error{}:", if count == 1 { "" } else { "s" })?;
        for error in &self.0 {
            writeln!(f, "  {error}")?;
        }
        Ok(())
    }
}

/// Collects problems while parsing goes on, so that all of them are reported at once.
#[derive(Debug, Default)]
pub struct ErrorSink {
    errors: Vec<ProjectError>,
}

impl ErrorSink {
    pub fn push(&mut self, location: SourceLocation, message: impl Into<String>) {
        self.errors.push(ProjectError::new(location, message));
    }

    /// Valid SQLMesh that sluice cannot run (see `ProjectError::unsupported`).
    pub fn push_unsupported(&mut self, location: SourceLocation, message: impl Into<String>) {
        self.errors.push(ProjectError::unsupported(location, message));
    }

    pub fn push_error(&mut self, error: ProjectError) {
        self.errors.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok(value)` when nothing was reported, otherwise every error sorted by location.
    pub fn finish<T>(mut self, value: T) -> Result<T, ProjectErrors> {
        if self.errors.is_empty() {
            return Ok(value);
        }
        self.errors.sort();
        self.errors.dedup();
        Err(ProjectErrors(self.errors))
    }
}
