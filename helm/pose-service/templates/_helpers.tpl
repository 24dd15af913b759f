{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "pose-service.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped object name: the release name, or release-chart when it lacks the chart name. */}}
{{- define "pose-service.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pose-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pose-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pose-service.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pose-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "pose-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* POSE_DEVICE: the explicit setting, else one "cuda:i" per requested GPU, else "cpu". */}}
{{- define "pose-service.device" -}}
{{- $count := int .Values.gpu.count }}
{{- if .Values.settings.device }}
{{- .Values.settings.device }}
{{- else if eq $count 0 }}
{{- "cpu" }}
{{- else if eq $count 1 }}
{{- "cuda" }}
{{- else }}
{{- $devices := list }}
{{- range $i := until $count }}
{{- $devices = append $devices (printf "cuda:%d" $i) }}
{{- end }}
{{- join "," $devices }}
{{- end }}
{{- end }}

{{/* Drain time the server needs after SIGTERM, in whole seconds (settings.drain_grace_s, default 30). */}}
{{- define "pose-service.drainSeconds" -}}
{{- $drain := .Values.settings.drain_grace_s }}
{{- if kindIs "invalid" $drain }}{{ $drain = 30 }}{{ end }}
{{- ceil $drain | int }}
{{- end }}

{{/*
Termination grace period: preStop sleep + drain + 15 s margin unless given; a given value must
exceed preStop + drain, or in-flight requests would be killed mid-drain.
*/}}
{{- define "pose-service.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.lifecycle.preStopSleepSeconds) (include "pose-service.drainSeconds" . | int) }}
{{- $given := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $given }}
{{- add $needed 15 }}
{{- else if le (int $given) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + settings.drain_grace_s (%d)" (int $given) $needed) }}
{{- else }}
{{- int $given }}
{{- end }}
{{- end }}

{{/* Path of the DistilPose weights inside the container, or "" with weights.source none. */}}
{{- define "pose-service.weightsPath" -}}
{{- if ne .Values.weights.source "none" }}
{{- printf "%s/%s" (trimSuffix "/" .Values.weights.mountPath) .Values.weights.file }}
{{- end }}
{{- end }}

{{- define "pose-service.apiKeysSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.apiKeys }}
{{- printf "%s-api-keys" (include "pose-service.fullname" .) }}
{{- end }}
{{- end }}
