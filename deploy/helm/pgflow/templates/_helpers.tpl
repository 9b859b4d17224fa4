{{/* Chart name, truncated to a DNS label. */}}
{{- define "pgflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; short enough for suffixed resource names. */}}
{{- define "pgflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pgflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels (stable across upgrades). */}}
{{- define "pgflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "pgflow.labels" -}}
helm.sh/chart: {{ include "pgflow.chart" . }}
{{ include "pgflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pgflow
{{- end }}

{{- define "pgflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "pgflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding the DSN: the existing one, or the one this chart renders. */}}
{{- define "pgflow.dsnSecretName" -}}
{{- if .Values.dsn.existingSecret }}
{{- .Values.dsn.existingSecret }}
{{- else }}
{{- printf "%s-dsn" (include "pgflow.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Kubernetes-safe form of a pgmq queue name (pgmq allows "_", DNS names do not).
Usage: include "pgflow.queueSlug" "my_queue"
*/}}
{{- define "pgflow.queueSlug" -}}
{{- . | lower | replace "_" "-" | trunc 25 | trimSuffix "-" }}
{{- end }}

{{/* Name of the worker Deployment (and its ScaledObject/HPA/PDB) of a queue.
Usage: include "pgflow.workerName" (dict "root" $ "queue" $q) */}}
{{- define "pgflow.workerName" -}}
{{- printf "%s-worker-%s" (include "pgflow.fullname" .root) (include "pgflow.queueSlug" .queue.name) }}
{{- end }}

{{/* Backlog (ready + in-flight messages) query of a queue, from keda.depthQuery.
Usage: include "pgflow.depthQuery" (dict "root" $ "queue" $q) */}}
{{- define "pgflow.depthQuery" -}}
{{- .root.Values.keda.depthQuery | replace "{queue}" .queue.name }}
{{- end }}

{{/* A component's extra entries after the chart-wide ones (extraEnv, extraVolumes,
extraVolumeMounts). Usage: include "pgflow.extras" (dict "root" $ "key" "extraEnv" "extra" .Values.worker.extraEnv)
renders a YAML list, or nothing when both are empty. */}}
{{- define "pgflow.extras" -}}
{{- $all := concat (index .root.Values .key | default list) (.extra | default list) }}
{{- if $all }}
{{- toYaml $all }}
{{- end }}
{{- end }}

{{/* Environment of a long-running pgflow container (and the test hook): the
config ConfigMap, the DSN, then extraEnv and the component's extraEnv (of two
entries with one name the later wins).
Usage: include "pgflow.env" (dict "root" $ "extraEnv" .Values.coordinator.extraEnv) */}}
{{- define "pgflow.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "pgflow.fullname" .root }}-config
env:
  - name: PGFLOW_DSN
    valueFrom:
      secretKeyRef:
        name: {{ include "pgflow.dsnSecretName" .root }}
        key: {{ .root.Values.dsn.secretKey }}
{{- with include "pgflow.extras" (dict "root" .root "key" "extraEnv" "extra" .extraEnv) }}
  {{- . | nindent 2 }}
{{- end }}
{{- end }}

{{/* /tmp (the image's HOME; the root filesystem is read-only), then
extraVolumeMounts and the component's.
Usage: include "pgflow.volumeMounts" (dict "root" $ "extraVolumeMounts" .Values.worker.extraVolumeMounts) */}}
{{- define "pgflow.volumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- with include "pgflow.extras" (dict "root" .root "key" "extraVolumeMounts" "extra" .extraVolumeMounts) }}
  {{- . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Startup, liveness and readiness probes on the metrics port. */}}
{{- define "pgflow.probes" -}}
{{- with .Values.probes.startup }}{{ if .enabled -}}
startupProbe:
  httpGet:
    path: {{ .path }}
    port: metrics
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{ end }}{{ end -}}
livenessProbe:
  httpGet:
    path: {{ .Values.probes.liveness.path }}
    port: metrics
  initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: {{ .Values.probes.readiness.path }}
    port: metrics
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end }}

{{/* Pod-level settings shared by every pgflow pod; the volumes are `tmp`, then
extraVolumes and the component's (names must be unique).
Usage: include "pgflow.podSpecCommon" (dict "root" $ "extraVolumes" .Values.worker.extraVolumes
[ "serviceAccountName" "other" ]) */}}
{{- define "pgflow.podSpecCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ .serviceAccountName | default (include "pgflow.serviceAccountName" $root) }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $seen := dict "tmp" true }}
{{- range concat $root.Values.extraVolumes (.extraVolumes | default list) }}
{{- if hasKey $seen .name }}
{{- fail (printf "volume name %q is used twice (`tmp` is the chart's own): rename it in extraVolumes" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
volumes:
  - name: tmp
    emptyDir: {}
{{- with include "pgflow.extras" (dict "root" $root "key" "extraVolumes" "extra" .extraVolumes) }}
  {{- . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod annotations: restart pods when the rendered config changes. */}}
{{- define "pgflow.podAnnotations" -}}
checksum/config: {{ printf "%s|%s|%s" (toJson .Values.config) .Values.dsn.existingSecret .Values.dsn.value | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
