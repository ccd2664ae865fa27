{{/* Chart name, and the "<release>-<chart>" prefix of every resource name. */}}
{{- define "protodino.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "protodino.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Common labels of every resource. */}}
{{- define "protodino.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "protodino.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: protodino
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "coordinator"). */}}
{{- define "protodino.selectorLabels" -}}
app.kubernetes.io/name: {{ include "protodino.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "protodino.coordinatorName" -}}
{{- printf "%s-coordinator" (include "protodino.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "protodino.workerName" -}}
{{- printf "%s-worker" (include "protodino.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The workers' headless Service (the StatefulSet's serviceName). */}}
{{- define "protodino.workerServiceName" -}}
{{- printf "%s-workers" (include "protodino.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "protodino.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "protodino.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "protodino.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Secret name and key of a token: include with (dict "ctx" $ "token" "job") or "join". */}}
{{- define "protodino.tokenSecretName" -}}
{{- $t := index .ctx.Values.auth (printf "%sToken" .token) -}}
{{- if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else -}}
{{- printf "%s-%s-token" (include "protodino.fullname" .ctx) .token | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Where the pods mount things. */}}
{{- define "protodino.dataRoot" -}}/var/lib/protodino/data{{- end -}}
{{- define "protodino.checkpointRoot" -}}/var/lib/protodino/checkpoints{{- end -}}
{{- define "protodino.configsDir" -}}/etc/protodino/configs{{- end -}}
{{- define "protodino.jobTokenFile" -}}/etc/protodino/job-token/token{{- end -}}
{{- define "protodino.joinTokenFile" -}}/etc/protodino/join-token/token{{- end -}}

{{/* The pod-level security context of every pod. */}}
{{- define "protodino.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser | int64 }}
runAsGroup: {{ .Values.podSecurity.runAsGroup | int64 }}
fsGroup: {{ .Values.podSecurity.fsGroup | int64 }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The container-level security context of every container. */}}
{{- define "protodino.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The data and checkpoint volumes (a claim or an emptyDir). */}}
{{- define "protodino.sharedVolumes" -}}
- name: data
  {{- if .Values.storage.data.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.storage.data.existingClaim | quote }}
    readOnly: true
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: checkpoints
  {{- if .Values.storage.checkpoints.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.storage.checkpoints.existingClaim | quote }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end -}}

{{- define "protodino.sharedVolumeMounts" -}}
- name: data
  mountPath: {{ include "protodino.dataRoot" . }}
  readOnly: true
  {{- with .Values.storage.data.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
- name: checkpoints
  mountPath: {{ include "protodino.checkpointRoot" . }}
  {{- with .Values.storage.checkpoints.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
{{- end -}}

{{/* prometheus.io annotations for a metrics port: include with (dict "enabled" … "port" …). */}}
{{- define "protodino.scrapeAnnotations" -}}
{{- if .enabled -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | int | toString | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* Checks across values that the schema cannot express; included by the coordinator. */}}
{{- define "protodino.validate" -}}
{{- $c := .Values.coordinator -}}
{{- $w := .Values.workers -}}
{{- if eq ($c.grpcPort | int) ($c.metricsPort | int) -}}
{{- fail "coordinator.grpcPort and coordinator.metricsPort must differ" -}}
{{- end -}}
{{- if eq ($w.collectivePort | int) ($w.metricsPort | int) -}}
{{- fail "workers.collectivePort and workers.metricsPort must differ" -}}
{{- end -}}
{{- if le ($c.heartbeatTimeoutMs | int64) ($c.heartbeatIntervalMs | int64) -}}
{{- fail "coordinator.heartbeatTimeoutMs must be longer than coordinator.heartbeatIntervalMs" -}}
{{- end -}}
{{- end -}}
