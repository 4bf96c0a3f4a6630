//go:build tools

// Package etcd only records the upstream main package that scripts/k8s-build
// compiles, so that go.mod and go.sum pin everything it needs.
package etcd

import _ "go.etcd.io/etcd/server/v3"
