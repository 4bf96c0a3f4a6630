//go:build tools

// Package kube only records the upstream main packages that scripts/k8s-build
// compiles, so that go.mod and go.sum pin everything they need.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
