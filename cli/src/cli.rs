//! The command line, shaped like Docker's image commands.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "gantry",
    version,
    about = "A container image engine with sandboxed WebAssembly transports and graph drivers"
)]
pub struct Cli {
    /// The TOML config (default: the built-in one: v2 transport, the driver `auto`).
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The store root; everything gantry writes lives below it.
    #[arg(long, global = true, env = "GANTRY_ROOT", default_value = "/var/lib/gantry")]
    pub root: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download images from a registry.
    Pull {
        /// One or more references; several are pulled at once, sharing downloads.
        #[arg(required = true)]
        references: Vec<String>,
        /// Pick this platform (os/arch[/variant]) from a multi-platform image.
        #[arg(long)]
        platform: Option<String>,
        /// Print only the image's name when done.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Push an image (a tag) to its registry.
    Push {
        reference: String,
        /// Push every tag of the reference's repository.
        #[arg(short = 'a', long)]
        all_tags: bool,
        /// Print only the digest lines.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List images.
    Images {
        /// `table` (default) or `json` (one object a line, like `docker images --format json`).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Only show image IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show low-level information on images, as JSON.
    Inspect {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show the history of an image.
    History {
        image: String,
        /// Do not truncate the CREATED BY column.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Create a tag TARGET that refers to SOURCE.
    Tag { source: String, target: String },
    /// Remove images.
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
        /// Remove an image referenced in several repositories.
        #[arg(short, long)]
        force: bool,
    },
    /// Write an image's flattened root filesystem as a tar.
    Export {
        image: String,
        /// The output file (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Load images from a `docker save` or OCI archive.
    Load {
        /// The archive (default: standard input).
        #[arg(short, long)]
        input: Option<PathBuf>,
        /// Print only the `Loaded image` lines, no progress.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Create an image from a root filesystem tarball (plain, gzip or zstd),
    /// as `docker import`.
    Import {
        /// The tarball, or `-` for standard input.
        file: String,
        /// The reference to tag the new image with.
        reference: Option<String>,
        /// A Dockerfile instruction for the image's config (CMD, ENTRYPOINT,
        /// ENV, EXPOSE, HEALTHCHECK, LABEL, ONBUILD, STOPSIGNAL, USER,
        /// VOLUME, WORKDIR); repeatable.
        #[arg(short, long = "change")]
        changes: Vec<String>,
        /// The commit message (default: "Imported from FILE").
        #[arg(short, long)]
        message: Option<String>,
        /// The platform the image declares (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
    },
    /// Save images to an archive.
    Save {
        #[arg(required = true)]
        images: Vec<String>,
        /// The archive to write (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// `docker` (manifest.json, what `docker load` reads) or `oci` (an OCI image layout).
        #[arg(long, value_enum, default_value_t = SaveFormat::Docker)]
        format: SaveFormat,
    },
    /// Check the store's consistency, clearing what a crash left behind.
    Fsck {
        /// Also rebuild every layer's tar from its files and check it
        /// against its diffID (reads every layer).
        #[arg(long)]
        verify_content: bool,
        /// Repair what can be: drop what nothing references, fetch damaged
        /// layers again from the registry they came from (implies
        /// --verify-content).
        #[arg(long)]
        repair: bool,
    },
    /// Serve a registry until SIGTERM: one that takes pushes (its storage
    /// is `<root>/registry`), the store's images (`--from-store`), or a
    /// pull-through cache (`--mirror-of`).
    #[command(args_conflicts_with_subcommands = true)]
    Serve {
        #[command(subcommand)]
        action: Option<ServeAction>,
        /// The address to listen on; port 0 picks a free port (the address
        /// is printed once listening).
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: std::net::SocketAddr,
        /// Serve the store's images, with the manifests and blobs they were
        /// pulled with.
        #[arg(long)]
        from_store: bool,
        /// Be a pull-through cache of this registry: `URL`, or `NAME=URL`
        /// to serve it under `NAME/` (repeatable). The cache lives in
        /// `<root>/mirror`.
        #[arg(long = "mirror-of", value_name = "[NAME=]URL")]
        mirror_of: Vec<String>,
        /// Seconds a cached tag answer is used before the upstream is asked
        /// again (a stale one is still served while the upstream is down).
        #[arg(long, default_value_t = 60)]
        tag_ttl: u64,
        /// Seconds a client may take to send a request's head, or stay idle.
        #[arg(long, default_value_t = 10)]
        header_timeout: u64,
        /// Pushes need basic auth from this htpasswd file (bcrypt entries,
        /// `htpasswd -B`); without it anyone who reaches the port may push.
        #[arg(long, value_name = "FILE")]
        htpasswd: Option<std::path::PathBuf>,
        #[command(flatten)]
        uploads: crate::commands::serve::UploadArgs,
        #[command(flatten)]
        token: crate::commands::serve::TokenArgs,
        #[command(flatten)]
        operate: crate::commands::serve::OperateArgs,
    },
    /// Answer Docker's Engine API image routes on a unix socket (the
    /// `docker` CLI with `DOCKER_HOST=unix://…`), until SIGTERM.
    Daemon {
        /// Where to listen (repeatable): `unix:///PATH`, or `tcp://IP:PORT`
        /// (`tcp://` alone: 127.0.0.1:2375; port 0 picks a free one).
        #[arg(
            short = 'H',
            long,
            default_value = "unix:///run/gantry.sock",
            conflicts_with = "tenants"
        )]
        host: Vec<String>,
        /// The group that may use the unix sockets (a name or a gid; the
        /// sockets are 0660): who is in it controls the store.
        #[arg(short = 'G', long, value_name = "GROUP")]
        group: Option<String>,
        /// Allow a TCP address other machines can reach. The Engine API has
        /// no authentication: whoever reaches it controls the store.
        #[arg(long)]
        allow_remote_tcp: bool,
        /// Serve several tenants, each with its own socket, store root and
        /// config (plugins, limits, registry allow-list), from this TOML file.
        #[arg(long, value_name = "FILE")]
        tenants: Option<std::path::PathBuf>,
    },
    /// The store as a whole.
    System {
        #[command(subcommand)]
        command: SystemCommand,
    },
    /// The config file.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The plugin registry: what is configured, and what a component is.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// List the configured plugins with their type, runtime, contract,
    /// limits and whether they load.
    Ls,
    /// Describe a component file: its kind, contract version, imports and
    /// exports (JSON), without running it.
    Inspect { path: PathBuf },
    /// Run the driver conformance suite against a driver component, in a
    /// scratch home under the store root (removed afterwards).
    Test {
        path: PathBuf,
        /// An option for the driver's `init`, `KEY=VALUE` (repeatable).
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SystemCommand {
    /// Show what the images take, what the store takes on disk, and its
    /// quota (`max_store_gib`).
    Df {
        /// `table` (default) or `json` (one object).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Print the effective config as TOML: every key, with the value it
    /// takes (the file's, else the built-in default); unset keys as
    /// comments saying what that means. Secrets are not shown.
    Show,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveFormat {
    Docker,
    Oci,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// What `gantry serve` does besides serving.
#[derive(clap::Subcommand, Debug)]
pub enum ServeAction {
    /// Remove the blobs of the registry's own storage (`[serve.storage]`)
    /// that no manifest worth keeping names; safe while the registry takes
    /// pushes (what was written within `[serve] gc_grace_seconds` stays).
    Gc {
        /// Say what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove manifests no tag names (and what only they name);
        /// manifests about a kept one (signatures) are kept.
        #[arg(long)]
        delete_untagged: bool,
    },
}
