"""Deploy fedsim's ClientApp on real Flower SuperNodes (Flower 1.41's deployment engine), secured
by default (docs/deploy.md):

    devices ── HTTPS, public port ──▶ nginx ── Fleet API only ──▶ SuperLink on 127.0.0.1
                                                                    ▲ Control API: `flwr`, on the server

- `certs`: a local CA, the SuperLink's certificate, SuperNode key pairs, and their checks.
- `flower`: Flower's command lines (`flower-superlink`, `flower-supernode`, `flwr`), the connection
  in `$FLWR_HOME/config.toml`, the run config of the fedsim ServerApp.
- `proxy`: the nginx configuration that exposes the Fleet API and nothing else.
- `supernode`: what `fedsim supernode` checks before it starts (partition, files, runtime port).
- `link_check`: whether the SuperLink answers the way a SuperNode will talk to it (TLS or not, CA).
- `warm`: the ClientApp runner that keeps the imports warm across messages.
- `processes`: ports, process groups, programs run side by side (`Together`).
- `local`: `LocalFederation`, all of it on one machine (`fedsim deploy local`, the tests).

Transport: Flower 1.41 serves the Fleet API over HTTP(S) with protobuf bodies; its SuperLink can
still start the older gRPC Fleet API behind an internal switch (`FLWR_INTERNAL_GRPC_FLEET_API=1`),
but the 1.41 `flower-supernode` has no gRPC client at all (`start_client_internal._init_connection`
only calls `http_request_response`), so fedsim uses HTTPS.
"""
