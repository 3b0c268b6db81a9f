{{/* The chart's name, or nameOverride. */}}
{{- define "outrigger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: names every object of this release. */}}
{{- define "outrigger.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "outrigger.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "outrigger.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "outrigger.serviceAccountName" -}}
{{- default (include "outrigger.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The namespace of the peer kubeconfig Secrets: never the release namespace. */}}
{{- define "outrigger.peerSecretNamespace" -}}
{{- $ns := required "peers.secretNamespace is required" .Values.peers.secretNamespace -}}
{{- if eq $ns .Release.Namespace -}}
{{- fail (printf "peers.secretNamespace must not be the release namespace (%s): the operator could then read its other Secrets through a PeerCluster" $ns) -}}
{{- end -}}
{{- $ns -}}
{{- end -}}

{{- define "outrigger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outrigger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "outrigger.labels" -}}
{{ include "outrigger.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: outrigger
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

