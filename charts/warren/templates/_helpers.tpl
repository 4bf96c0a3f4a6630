{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "warren.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name, the prefix of every resource name: the release name, followed by
the chart name when the release name does not contain it.
*/}}
{{- define "warren.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "warren.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "warren.labels" -}}
helm.sh/chart: {{ include "warren.chart" . }}
{{ include "warren.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: warren
{{- end }}

{{/* Labels that select the operator pods. */}}
{{- define "warren.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warren.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "warren.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "warren.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the webhook Service (the operator's WARREN_WEBHOOK_SERVICE). */}}
{{- define "warren.webhookServiceName" -}}
{{- printf "%s-webhook" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the MutatingWebhookConfiguration (WARREN_WEBHOOK_CONFIG). */}}
{{- define "warren.webhookConfigName" -}}
{{- include "warren.fullname" . }}
{{- end }}

{{- define "warren.injectionConfigName" -}}
{{- printf "%s-injection" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warren.certificateName" -}}
{{- printf "%s-webhook" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warren.certificateSecretName" -}}
{{- printf "%s-webhook-tls" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warren.issuerName" -}}
{{- printf "%s-selfsigned" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warren.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "warren.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (.Values.sidecar.image.tag | default .Chart.AppVersion) }}
{{- end }}
