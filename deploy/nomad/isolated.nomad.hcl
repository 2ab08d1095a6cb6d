# isolated on every Nomad client node that runs actions (deploy/README.md).
# Owns: the system job that keeps one isolated per node, its secrets (from
# Nomad variables) and its service registration with a gRPC health check.
# It does not install isolated: `make install` on each node puts the binaries
# in /usr/local/bin and the config in /etc/isolated/config.toml (raw_exec
# runs them on the host, as the systemd unit would: isolated needs the node's
# containerd, mounts, iptables and cgroups, which an isolating driver hides).
#
# Secrets: nomad var put nomad/jobs/isolated tokens=@tokens.toml \
#            tls_crt=@tls.crt tls_key=@tls.key ca_crt=@ca.crt
# Nodes: meta { direktiv_isolate = "true" } in the client's config, and
# raw_exec enabled (plugin "raw_exec" { config { enabled = true } }).
job "isolated" {
  type = "system"

  constraint {
    attribute = "${meta.direktiv_isolate}"
    value     = "true"
  }

  update {
    # One node at a time: its running actions go on under containerd and are
    # re-attached when isolated is back.
    max_parallel = 1
  }

  group "isolated" {
    network {
      port "grpc" {
        static = 8888
      }
      port "metrics" {
        static = 9464
      }
    }

    # Registered for the flow engine's resolver; the check is gRPC health of
    # isolate.DirektivIsolate over TLS (a client without a certificate may
    # ask health only), NOT_SERVING while the node cannot take work.
    service {
      name     = "isolated"
      port     = "grpc"
      provider = "consul"

      check {
        type            = "grpc"
        port            = "grpc"
        grpc_service    = "isolate.DirektivIsolate"
        grpc_use_tls    = true
        tls_skip_verify = false
        interval        = "5s"
        timeout         = "3s"
      }
    }

    task "isolated" {
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/isolated"
        args = [
          "--config", "/etc/isolated/config.toml",
          "--bind", "0.0.0.0:8888",
          "--tls-cert", "${NOMAD_SECRETS_DIR}/tls.crt",
          "--tls-key", "${NOMAD_SECRETS_DIR}/tls.key",
          "--tls-client-ca", "${NOMAD_SECRETS_DIR}/ca.crt",
          "--auth-tokens-file", "${NOMAD_SECRETS_DIR}/tokens.toml",
          "--metrics-bind", "0.0.0.0:9464",
        ]
      }

      # isolated lets running actions go on for 10 s at SIGTERM, then exits.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      # Rendered on every change of the variable: isolated re-reads the
      # tokens file within a second (the certificates at its next start:
      # change_mode restarts it, which loses no action).
      template {
        destination = "${NOMAD_SECRETS_DIR}/tokens.toml"
        perms       = "0400"
        change_mode = "noop"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/isolated" }}{{ .tokens }}{{ end }}
        EOT
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/tls.crt"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/isolated\" }}{{ .tls_crt }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/tls.key"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/isolated\" }}{{ .tls_key }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/ca.crt"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/isolated\" }}{{ .ca_crt }}{{ end }}"
      }

      resources {
        cpu    = 100
        # The daemon holds inputs on disk, not in memory; 512 MiB leaves room
        # for a burst of large reports. Actions are not counted here: they
        # run in containerd's cgroups.
        memory = 512
      }
    }
  }
}
