//! The Rune daemon (`runed`) and CLI (`rune`): configuration, the gRPC API, the HTTP and metrics
//! endpoints, signals, and the command line. Both binaries are thin `main`s over this library.

#![deny(unsafe_code)]

pub mod admin_api;
pub mod api;
pub mod auth;
pub mod castfile;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod instances_api;
pub mod network_api;
pub mod secrets_api;
pub mod tls;
pub mod yaml;
