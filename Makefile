# The two commands a newcomer needs: `make demo` and `make test`.
CARGO ?= cargo
PLUGINS := -p gantry-transport-v2 -p gantry-transport-v1 -p gantry-driver-vfs -p gantry-driver-overlay2 -p gantry-bad-driver -p gantry-bad-transport

.PHONY: all deps plugins build test demo bench lint

all: build

## The wasm32-wasip2 target and the Debian peers (docker-registry, skopeo, umoci).
deps:
	./scripts/setup-deps.sh

## Plugins: WebAssembly components for wasm32-wasip2.
plugins: deps
	$(CARGO) build --release --target wasm32-wasip2 $(PLUGINS)

## The gantry binary, the core and the test harness (one shared target dir),
## and overlay2's native build (the trusted fast path, a shared library).
build: plugins
	$(CARGO) build --release
	$(CARGO) build --release -p gantry-driver-overlay2 --features native

## Every test: unit tests, the tidy test, end-to-end tests against real peers
## (with the default driver, overlay2 where the machine allows it; again with overlay2
## mounting as kernels before 6.13 must; then with vfs), and the load, pull, export,
## save and push tests once more as an unprivileged user.
test: build
	$(CARGO) test --release
	GANTRY_OVERLAY_LAYERS=proc-paths $(CARGO) test --release --test e2e -- --skip bigfiles --skip serve_s3
	GANTRY_TEST_DRIVER=vfs $(CARGO) test --release --test e2e -- --skip serve_s3
	GANTRY_TEST_UNPRIVILEGED=1 $(CARGO) test --release --test e2e -- archives:: pull:: push:: import::

## Build everything, start a registry on 127.0.0.1 with the example image, pull it.
demo: build
	./examples/demo.sh

## Pull, load and save benchmarks against containerd, podman and skopeo,
## the sandbox's cost, serving against docker-registry, pushing against skopeo and podman (root; ~4 GiB of disk).
bench: build
	./bench/pull.sh
	./bench/load.sh
	./bench/sandbox.sh
	./bench/serve.sh
	./bench/push.sh
	./bench/daemon.sh
	./bench/quota.sh

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	$(CARGO) clippy --release --target wasm32-wasip2 $(PLUGINS) -- -D warnings
	$(CARGO) clippy --release -p gantry-driver-overlay2 --features native -- -D warnings
	cd examples/driver-quota && $(CARGO) fmt --check && CARGO_TARGET_DIR=../../target/example-build $(CARGO) clippy --release --locked --target wasm32-wasip2 -- -D warnings
