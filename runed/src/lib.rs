//! The Rune daemon (`runed`) and CLI (`rune`): configuration, the gRPC API, the HTTP and metrics
//! endpoints, signals, and the command line. Both binaries are thin `main`s over this library.

#![deny(unsafe_code)]

pub mod admin_api;
pub mod api;
pub mod auth;
pub mod castfile;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod grpc;
pub mod health;
pub mod instances_api;
pub mod metrics;
pub mod network_api;
pub mod paging;
pub mod releases_api;
pub mod restore;
pub mod runeset;
pub mod sealing;
pub mod secrets_api;
pub mod serve;
pub mod systemd;
pub mod tls;
pub mod yaml;
