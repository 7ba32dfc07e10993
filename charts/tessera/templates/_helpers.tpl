{{/* Names, labels, images and shared pieces of the Tessera chart. */}}

{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tessera.fullname" -}}
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

{{- define "tessera.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "tessera.labels" -}}
helm.sh/chart: {{ include "tessera.chart" . }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "node"). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tessera.componentLabels" -}}
{{ include "tessera.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference: digest when given, else the tag. Call with the image dict. */}}
{{- define "tessera.imageRef" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* Tessera's own image: the tag defaults to the chart's appVersion. */}}
{{- define "tessera.image" -}}
{{- $img := .Values.image }}
{{- include "tessera.imageRef" (dict "repository" $img.repository "tag" (default .Chart.AppVersion $img.tag) "digest" $img.digest) }}
{{- end }}

{{- define "tessera.tokenSecretName" -}}
{{- default (printf "%s-token" (include "tessera.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "tessera.managementName" -}}
{{- printf "%s-management" (include "tessera.fullname" .) }}
{{- end }}

{{/* The URL agents and the CSI plugin use to reach management. */}}
{{- define "tessera.managementURL" -}}
{{- printf "http://%s.%s.svc:%v" (include "tessera.managementName" .) .Release.Namespace .Values.management.port }}
{{- end }}

{{/* Where the token Secret is mounted in every Tessera container. */}}
{{- define "tessera.tokenDir" -}}/etc/tessera/token{{- end }}

{{- define "tessera.tokenVolume" -}}
- name: token
  secret:
    secretName: {{ include "tessera.tokenSecretName" . }}
    defaultMode: 0440
    items:
      - key: token
        path: token
{{- end }}

{{/* Hardened container settings for a process that needs no privilege. */}}
{{- define "tessera.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
The VPGs of the StorageClasses, NAME=LAYOUT, once each. Two classes naming
one VPG with different layouts is a values error, refused here rather than
left for management to refuse at start.
*/}}
{{- define "tessera.vpgs" -}}
{{- /* NAME=LAYOUT[,legs=N][,chunk=SIZE]: one flag per vpg; two entries of one vpg must agree */}}
{{- $specs := dict }}
{{- range .Values.storageClasses }}
{{- $spec := .layout }}
{{- if .legs }}{{ $spec = printf "%s,legs=%d" $spec (int .legs) }}{{ end }}
{{- if .chunk }}{{ $spec = printf "%s,chunk=%s" $spec .chunk }}{{ end }}
{{- $seen := get $specs .vpg }}
{{- if and $seen (ne $seen $spec) }}
{{- fail (printf "storageClasses: vpg %q is given two layouts (%q and %q)" .vpg $seen $spec) }}
{{- end }}
{{- $_ := set $specs .vpg $spec }}
{{- end }}
{{- range $name := keys $specs | sortAlpha }}
- --vpg={{ $name }}={{ get $specs $name }}
{{- end }}
{{- end }}

{{/*
Probes of a kubernetes-csi sidecar with leader election: its --http-endpoint
serves /healthz/leader-election, failing when it holds the lease but can no
longer renew it (restarting it hands the lease over).
*/}}
{{- define "tessera.leaderProbes" -}}
livenessProbe:
  httpGet:
    path: /healthz/leader-election
    port: {{ .port }}
  initialDelaySeconds: 10
  periodSeconds: 20
  timeoutSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /healthz/leader-election
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
{{- end }}

{{/*
Probes of the livenessprobe sidecar itself: its image has no shell and its
/healthz answers for the CSI plugin (not for itself), so it is alive and
ready when its listener accepts connections. The port is a number: the name
`healthz` belongs to the plugin container, whose liveness it serves.
*/}}
{{- define "tessera.socketProbes" -}}
livenessProbe:
  tcpSocket:
    port: {{ .port }}
  initialDelaySeconds: 5
  periodSeconds: 20
readinessProbe:
  tcpSocket:
    port: {{ .port }}
  periodSeconds: 10
{{- end }}
