{{/*
Chart name, shortened to 63 characters (the limit of a label value).
*/}}
{{- define "outbox-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: <release>-<chart>, or the release name alone when it already
contains the chart name.
*/}}
{{- define "outbox-operator.fullname" -}}
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

{{- define "outbox-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object of the chart.
*/}}
{{- define "outbox-operator.labels" -}}
helm.sh/chart: {{ include "outbox-operator.chart" . }}
{{ include "outbox-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- end }}

{{/*
Labels that select the operator pod. Never change them: a Deployment's selector is immutable.
*/}}
{{- define "outbox-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "outbox-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository:tag, or repository@digest when a digest is given.
*/}}
{{- define "outbox-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "outbox-operator.workerImage" -}}
{{- default (include "outbox-operator.image" .) .Values.operator.workerImage }}
{{- end }}

{{/*
The namespaces the operator watches in namespaced scope, as a JSON list (use with fromJsonArray).
*/}}
{{- define "outbox-operator.watchNamespaces" -}}
{{- if .Values.operator.namespaces }}
{{- .Values.operator.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/*
The CRD shipped in crds/ (a byte-identical copy of the repository's crds/outboxpublisher.yaml).
RBAC, the example and NOTES read the API group and names from it, so they cannot drift from it.
*/}}
{{- define "outbox-operator.crd" -}}
{{- .Files.Get "crds/outboxpublisher.yaml" | fromYaml | toJson }}
{{- end }}
